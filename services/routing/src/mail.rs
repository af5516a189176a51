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
/// body; used by tests and by `beseda ctl outbox`.
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
            let body =
                text.split_once("\r\n\r\n").or_else(|| text.split_once("\n\n")).map(|(_, body)| body.to_owned())?;
            newest = Some((modified, body));
        }
    }
    newest.map(|(_, body)| body)
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
}
