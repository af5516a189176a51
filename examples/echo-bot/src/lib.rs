//! An application server with one predefined bot, "EchoBot", written the
//! way docs/bots.md describes: one processing connection for the whole
//! application (ВыполнитьОбработкуБотов), ExecuteBotProcessing every
//! `renew` interval, every event acknowledged only after its handler
//! succeeded. The handler is the one of §29.4.6.3.3:
//!
//! ```text
//! Процедура ОбработкаСообщенияСистемыВзаимодействия(Сообщение, ДополнительныеПараметры)
//!     Ответ = СистемаВзаимодействия.СоздатьСообщение(Сообщение.Обсуждение);
//!     Ответ.Текст = "echo" + Символы.ПС + ">" + СтрСоединить(СтрРазделить(Сообщение.Текст, Символы.ПС), Символы.ПС + ">");
//!     Ответ.Записать();
//! КонецПроцедуры
//! ```
//!
//! It answers through the REST API as the bot's user, with the delivery id
//! as `clientMessageId`: if the acknowledgement is lost and the event comes
//! again, the answer is not posted twice.

use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Where the server is and who the application is.
#[derive(Clone, Debug)]
pub struct Settings {
    /// e.g. http://127.0.0.1:8087
    pub server_url: String,
    pub application_id: String,
    pub application_key: String,
    /// How often to call ExecuteBotProcessing (the lease is 2 minutes).
    pub renew: Duration,
}

/// The echo of a message text: "echo", then each line quoted with ">".
pub fn echo(text: &str) -> String {
    format!("echo\n>{}", text.split('\n').collect::<Vec<_>>().join("\n>"))
}

fn authorization(settings: &Settings) -> String {
    let credentials = format!("{}:{}", settings.application_id, settings.application_key);
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(credentials))
}

/// Serves the bot until the server closes the connection or `stop` resolves.
pub async fn run(settings: Settings, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let ws_url = format!("{}/bots/v1/processing", settings.server_url.replacen("http", "ws", 1));
    let mut request = ws_url.as_str().into_client_request()?;
    request.headers_mut().insert("authorization", authorization(&settings).parse()?);
    let (mut socket, _) =
        tokio_tungstenite::connect_async(request).await.context("cannot open the processing connection")?;
    let execute = json!({"execute": {"predefinedBots": [{"botType": "EchoBot", "name": "Echo Bot"}]}});
    socket.send(Message::Text(execute.to_string().into())).await?;
    let http = reqwest::Client::new();
    let mut renew = tokio::time::interval(settings.renew);
    renew.tick().await;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = renew.tick() => socket.send(Message::Text(execute.to_string().into())).await?,
            frame = socket.next() => {
                let frame = match frame {
                    Some(Ok(Message::Text(text))) => serde_json::from_str::<Value>(text.as_str())?,
                    Some(Ok(Message::Close(_))) | None => return Ok(()),
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => return Err(error.into()),
                };
                if let Some(closed) = frame.get("closed") {
                    tracing::info!(%closed, "the server closed the processing connection");
                    return Ok(());
                }
                if let Some(error) = frame.get("error") {
                    bail!("the server refused a frame: {error}");
                }
                if let Some(event) = frame.get("event") {
                    let delivery_id = event["deliveryId"].clone();
                    let reply = match handle(&http, &settings, event).await {
                        Ok(()) => json!({"ack": {"deliveryId": delivery_id}}),
                        Err(error) => json!({"nack": {"deliveryId": delivery_id, "error": format!("{error:#}")}}),
                    };
                    socket.send(Message::Text(reply.to_string().into())).await?;
                }
            }
        }
    }
}

/// ОбработкаСообщенияСистемыВзаимодействия: answers messages, ignores the rest.
async fn handle(http: &reqwest::Client, settings: &Settings, event: &Value) -> anyhow::Result<()> {
    if event["kind"] != "BOT_EVENT_KIND_MESSAGE" {
        return Ok(());
    }
    let conversation_id = event["conversationId"].as_str().context("event without conversationId")?;
    let bot_user = event["bot"]["userId"].as_str().context("event without bot.userId")?;
    let text = event["message"]["text"].as_str().unwrap_or_default();
    let answer = http
        .post(format!("{}/api/v1/conversations/{conversation_id}/messages", settings.server_url))
        .header("authorization", authorization(settings))
        .header("x-beseda-act-as-user", bot_user)
        .json(&json!({"text": echo(text), "clientMessageId": format!("echo-{}", event["deliveryId"].as_str().unwrap_or_default())}))
        .send()
        .await?;
    if !answer.status().is_success() {
        bail!("SendMessage answered {}: {}", answer.status(), answer.text().await.unwrap_or_default());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn echo_quotes_every_line() {
        assert_eq!(super::echo("hi"), "echo\n>hi");
        assert_eq!(super::echo("a\nb"), "echo\n>a\n>b");
    }
}
