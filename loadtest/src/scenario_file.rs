//! Scenario files: a TOML table with `scenario = "<name>"` and the
//! scenario's flags as keys (without the dashes, `_` or `-` alike). They
//! become the same command line the flags would, so a file and flags can
//! never mean different things.

use anyhow::{Context, bail};

/// The command line a scenario file stands for.
pub fn arguments(text: &str) -> anyhow::Result<Vec<String>> {
    let table: toml::Table = toml::from_str(text).context("the scenario file is not valid TOML")?;
    let scenario = table
        .get("scenario")
        .and_then(toml::Value::as_str)
        .context("the scenario file needs `scenario = \"<name>\"` (e.g. \"fanout\")")?;
    let mut arguments = vec!["beseda-loadtest".to_owned(), scenario.to_owned()];
    for (key, value) in &table {
        if key == "scenario" {
            continue;
        }
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            toml::Value::Boolean(true) => arguments.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(values) => {
                for value in values {
                    arguments.push(flag.clone());
                    arguments.push(scalar(key, value)?);
                }
            }
            other => {
                arguments.push(flag);
                arguments.push(scalar(key, other)?);
            }
        }
    }
    Ok(arguments)
}

fn scalar(key: &str, value: &toml::Value) -> anyhow::Result<String> {
    Ok(match value {
        toml::Value::String(text) => text.clone(),
        toml::Value::Integer(number) => number.to_string(),
        toml::Value::Float(number) => number.to_string(),
        toml::Value::Boolean(flag) => flag.to_string(),
        _ => bail!("`{key}`: give a string, a number, a boolean or a list of them"),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_become_flags() {
        let arguments = super::arguments(
            "scenario = \"fanout\"\nmembers = 500\nrate = 250.5\nrelay = true\nquiet = false\n\
             target = [\"http://a:1\", \"http://b:2\"]\nreport_dir = \"out\"\n",
        )
        .unwrap();
        // Keys come in the table's (sorted) order; `false` flags are left out.
        let expected = [
            "beseda-loadtest",
            "fanout",
            "--members",
            "500",
            "--rate",
            "250.5",
            "--relay",
            "--report-dir",
            "out",
            "--target",
            "http://a:1",
            "--target",
            "http://b:2",
        ];
        assert_eq!(arguments, expected.map(String::from));
    }

    #[test]
    fn a_file_without_a_scenario_is_refused() {
        assert!(super::arguments("members = 5").is_err());
    }
}
