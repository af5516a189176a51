//! `google.protobuf.Timestamp` with the canonical proto3 JSON form.
//!
//! pbjson-types writes timestamps with chrono's `to_rfc3339`, which gives
//! `+00:00` and always nine or six fractional digits depending on the value;
//! the proto3 JSON mapping (and docs/api.md) promise RFC 3339 ending in `Z`
//! with 0, 3, 6 or 9 fractional digits. The binary encoding is the same as
//! the well-known type's (`proto/build.rs` maps `.google.protobuf.Timestamp`
//! here), so nothing changes on the wire; only JSON text differs. Reading
//! accepts any RFC 3339 offset, as before.

use serde::de::Error as _;

/// Seconds and nanoseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, PartialEq, Eq, Hash, ::prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// 0 to 999,999,999, also before the epoch.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// Seconds from 0001-01-01T00:00:00Z and to 9999-12-31T23:59:59Z, the range
/// proto3 JSON allows.
const MIN_SECONDS: i64 = -62_135_596_800;
const MAX_SECONDS: i64 = 253_402_300_799;

impl Timestamp {
    /// The canonical proto3 JSON text, e.g. `2025-11-24T09:30:00.123456Z`.
    /// `None` outside years 1 to 9999 or with nanoseconds out of range.
    pub fn to_rfc3339(&self) -> Option<String> {
        if !(MIN_SECONDS..=MAX_SECONDS).contains(&self.seconds) || !(0..1_000_000_000).contains(&self.nanos) {
            return None;
        }
        let days = self.seconds.div_euclid(86_400);
        let second_of_day = self.seconds.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        let (hour, minute, second) = (second_of_day / 3600, second_of_day % 3600 / 60, second_of_day % 60);
        let fraction = match self.nanos {
            0 => String::new(),
            nanos if nanos % 1_000_000 == 0 => format!(".{:03}", nanos / 1_000_000),
            nanos if nanos % 1_000 == 0 => format!(".{:06}", nanos / 1_000),
            nanos => format!(".{nanos:09}"),
        };
        Some(format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{fraction}Z"))
    }
}

/// Year, month and day of a day count from 1970-01-01 in the proleptic
/// Gregorian calendar (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.to_rfc3339() {
            Some(text) => serializer.serialize_str(&text),
            None => Err(serde::ser::Error::custom(format!(
                "timestamp {}s {}ns is outside years 1 to 9999",
                self.seconds, self.nanos
            ))),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    /// Any RFC 3339 text: `Z` or a numeric offset, any fractional digits.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let parsed = pbjson_types::Timestamp::deserialize(deserializer)?;
        let timestamp = Timestamp { seconds: parsed.seconds, nanos: parsed.nanos };
        if timestamp.to_rfc3339().is_none() {
            return Err(D::Error::custom("timestamps must lie in years 1 to 9999"));
        }
        Ok(timestamp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(seconds: i64, nanos: i32) -> String {
        serde_json::to_string(&Timestamp { seconds, nanos }).unwrap()
    }

    #[test]
    fn written_in_utc_with_z_and_canonical_fraction_digits() {
        assert_eq!(json(0, 0), r#""1970-01-01T00:00:00Z""#);
        assert_eq!(json(1_577_934_245, 0), r#""2020-01-02T03:04:05Z""#);
        assert_eq!(json(1_764_000_000, 125_000_000), r#""2025-11-24T16:00:00.125Z""#);
        assert_eq!(json(1_764_000_000, 123_456_000), r#""2025-11-24T16:00:00.123456Z""#);
        assert_eq!(json(1_764_000_000, 1), r#""2025-11-24T16:00:00.000000001Z""#);
        assert_eq!(json(951_782_400, 0), r#""2000-02-29T00:00:00Z""#, "leap day");
        assert_eq!(json(-1, 500_000_000), r#""1969-12-31T23:59:59.500Z""#);
        assert_eq!(json(MIN_SECONDS, 0), r#""0001-01-01T00:00:00Z""#);
        assert_eq!(json(MAX_SECONDS, 999_999_999), r#""9999-12-31T23:59:59.999999999Z""#);
    }

    #[test]
    fn outside_the_proto3_range_is_an_error_not_garbage() {
        assert!(serde_json::to_string(&Timestamp { seconds: MAX_SECONDS + 1, nanos: 0 }).is_err());
        assert!(serde_json::to_string(&Timestamp { seconds: 0, nanos: -1 }).is_err());
        assert!(serde_json::from_str::<Timestamp>(r#""+10000-01-01T00:00:00Z""#).is_err());
    }

    #[test]
    fn reads_z_and_any_offset() {
        let expected = Timestamp { seconds: 1_577_934_245, nanos: 120_000_000 };
        for text in ["2020-01-02T03:04:05.12Z", "2020-01-02T03:04:05.120+00:00", "2020-01-02T06:04:05.12+03:00"] {
            assert_eq!(serde_json::from_str::<Timestamp>(&format!("\"{text}\"")).unwrap(), expected, "{text}");
        }
    }

    #[test]
    fn agrees_with_chrono_over_a_range_of_days() {
        // pbjson-types parses with chrono: what is written reads back the same.
        for day in (-719_162..2_932_897).step_by(997) {
            let timestamp = Timestamp { seconds: day * 86_400 + 45_296, nanos: 7_000 };
            let text = serde_json::to_string(&timestamp).unwrap();
            assert_eq!(serde_json::from_str::<Timestamp>(&text).unwrap(), timestamp, "{text}");
        }
    }
}
