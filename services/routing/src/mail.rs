//! Outgoing mail: activation codes, administration keys and temporary codes.
//! Production sends through SMTP (lettre); the embedded default writes each
//! message as an `.eml` file into an outbox directory and logs its path, so a
//! fresh install works without a mail server and nothing is silently lost.

use std::path::PathBuf;

use async_trait::async_trait;
use beseda_core::{Error, ErrorCode, Result};
use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// Sends one plain-text e-mail.
#[async_trait]
pub trait Mailer: Send + Sync + 'static {
    async fn send(&self, to: &str, subject: &str, body: &str) -> Result<()>;
    /// Where mail goes, for the start-up banner.
    fn describe(&self) -> String;
}

fn build_message(from: &Mailbox, to: &str, subject: &str, body: &str) -> Result<Message> {
    let to: Mailbox = to.parse().map_err(|_| {
        Error::new(ErrorCode::EmailInvalid, format!("`{to}` is not a valid e-mail address")).with_field("email")
    })?;
    Message::builder()
        .from(from.clone())
        .to(to)
        .subject(subject)
        .header(ContentType::TEXT_PLAIN)
        .body(body.to_owned())
        .map_err(|error| Error::internal(format!("cannot build e-mail: {error}")))
}

fn parse_from(from: &str) -> Result<Mailbox> {
    from.parse().map_err(|_| Error::invalid("mail.from", format!("`{from}` is not a valid sender address")))
}

/// Writes mail into a directory, one `<uuid>.eml` file per message.
pub struct OutboxMailer {
    directory: PathBuf,
    from: Mailbox,
    transport: AsyncFileTransport<Tokio1Executor>,
}

impl OutboxMailer {
    pub fn new(directory: PathBuf, from: &str) -> Result<Self> {
        std::fs::create_dir_all(&directory)
            .map_err(|error| Error::internal(format!("cannot create mail outbox {}: {error}", directory.display())))?;
        let transport = AsyncFileTransport::new(&directory);
        Ok(OutboxMailer { directory, from: parse_from(from)?, transport })
    }
}

#[async_trait]
impl Mailer for OutboxMailer {
    async fn send(&self, to: &str, subject: &str, body: &str) -> Result<()> {
        let message = build_message(&self.from, to, subject, body)?;
        let id = self.transport.send(message).await.map_err(|error| {
            Error::new(ErrorCode::Unavailable, format!("cannot write e-mail to the outbox: {error}"))
        })?;
        let path = self.directory.join(format!("{id}.eml"));
        tracing::info!(to, subject, path = %path.display(), "mail written to outbox");
        Ok(())
    }

    fn describe(&self) -> String {
        format!("outbox directory {}", self.directory.display())
    }
}

/// Sends through an SMTP relay given as a URL, e.g.
/// `smtps://user:password@mail.example.com` or `smtp://relay:25?tls=required`.
pub struct SmtpMailer {
    description: String,
    from: Mailbox,
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl SmtpMailer {
    pub fn new(url: &str, from: &str) -> Result<Self> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|error| Error::invalid("mail.smtpUrl", format!("invalid SMTP URL: {error}")))?
            .build();
        let description = match url.split_once('@') {
            Some((_, host)) => format!("SMTP relay {host}"),
            None => format!("SMTP relay {url}"),
        };
        Ok(SmtpMailer { description, from: parse_from(from)?, transport })
    }
}

#[async_trait]
impl Mailer for SmtpMailer {
    async fn send(&self, to: &str, subject: &str, body: &str) -> Result<()> {
        let message = build_message(&self.from, to, subject, body)?;
        self.transport.send(message).await.map_err(|error| {
            Error::new(ErrorCode::Unavailable, format!("the SMTP relay refused the e-mail: {error}"))
        })?;
        tracing::info!(to, subject, "mail sent");
        Ok(())
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// Finds the newest message to `to` in an outbox directory and returns its
/// body as text, decoded from its Content-Transfer-Encoding (lettre writes
/// long lines as quoted-printable, which would split URLs with `=` at the
/// line ends); used by tests and by `beseda ctl outbox`.
pub fn latest_outbox_body(directory: &std::path::Path, to: &str) -> Option<String> {
    let mut newest: Option<(std::time::SystemTime, String)> = None;
    for entry in std::fs::read_dir(directory).ok()?.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|extension| extension != "eml") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let addressed =
            text.lines().any(|line| line.starts_with("To:") && line.to_lowercase().contains(&to.to_lowercase()));
        if !addressed {
            continue;
        }
        let modified = entry.metadata().and_then(|metadata| metadata.modified()).unwrap_or(std::time::UNIX_EPOCH);
        if newest.as_ref().is_none_or(|(time, _)| modified >= *time) {
            let (headers, body) = text.split_once("\r\n\r\n").or_else(|| text.split_once("\n\n"))?;
            newest = Some((modified, decode_body(headers, body)));
        }
    }
    newest.map(|(_, body)| body)
}

/// The text of a mail body in the transfer encoding its headers name.
fn decode_body(headers: &str, body: &str) -> String {
    let encoding = headers
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim().eq_ignore_ascii_case("content-transfer-encoding").then(|| value.trim().to_ascii_lowercase())
        })
        .unwrap_or_default();
    let decoded = match encoding.as_str() {
        "quoted-printable" => quoted_printable::decode(body, quoted_printable::ParseMode::Robust).ok(),
        "base64" => {
            use base64::Engine;
            let compact: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            base64::engine::general_purpose::STANDARD.decode(compact).ok()
        }
        _ => None,
    };
    match decoded {
        Some(bytes) => String::from_utf8_lossy(&bytes).replace("\r\n", "\n"),
        None => body.replace("\r\n", "\n"),
    }
}

/// The secret a Beseda mail carries (activation code, temporary code or
/// administration key): every such mail puts it alone on a line indented by
/// four spaces, so scripts need not know which kind of mail it is.
pub fn secret_in(body: &str) -> Option<&str> {
    body.lines()
        .filter_map(|line| line.strip_prefix("    "))
        .map(str::trim)
        .find(|secret| !secret.is_empty() && !secret.contains(char::is_whitespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outbox_mail_can_be_read_back() {
        let directory = tempfile::tempdir().unwrap();
        let mailer = OutboxMailer::new(directory.path().to_owned(), "Beseda <beseda@localhost>").unwrap();
        mailer.send("owner@example.com", "Your activation code", "code: 12345678").await.unwrap();
        let body = latest_outbox_body(directory.path(), "owner@example.com").unwrap();
        assert!(body.contains("code: 12345678"), "{body}");
        assert!(latest_outbox_body(directory.path(), "someone@else.com").is_none());
    }

    #[tokio::test]
    async fn long_lines_come_back_decoded_with_their_secret() {
        let directory = tempfile::tempdir().unwrap();
        let mailer = OutboxMailer::new(directory.path().to_owned(), "Beseda <beseda@localhost>").unwrap();
        // Longer than 76 characters, as the real activation mail is: lettre
        // writes it quoted-printable and breaks it with soft line breaks.
        let text = "Your activation code for registering \"Sales\" on the Beseda server http://127.0.0.1:8087 is:\n\n    12345678\n\nIt is valid for 24 hours.\n";
        mailer.send("owner@example.com", "Your activation code", text).await.unwrap();
        let raw = std::fs::read_dir(directory.path())
            .unwrap()
            .flatten()
            .map(|entry| std::fs::read_to_string(entry.path()).unwrap())
            .next()
            .unwrap();
        assert!(raw.contains("quoted-printable") && raw.contains("=\r\n"), "the test needs an encoded mail: {raw}");
        let body = latest_outbox_body(directory.path(), "owner@example.com").unwrap();
        assert_eq!(body, text);
        assert_eq!(secret_in(&body), Some("12345678"));
        assert_eq!(secret_in("no secret here\n"), None);
    }
}
