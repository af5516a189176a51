//! `beseda-echo-bot`: run the example bot against a Beseda server.
//!
//! ```sh
//! BESEDA_URL=http://127.0.0.1:8087 BESEDA_APPLICATION_ID=... BESEDA_APPLICATION_KEY=... \
//!     cargo run -p beseda-echo-bot
//! ```

use std::time::Duration;

fn variable(name: &str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| anyhow::anyhow!("set {name} (see examples/echo-bot/README.md)"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let settings = beseda_echo_bot::Settings {
        server_url: std::env::var("BESEDA_URL").unwrap_or_else(|_| "http://127.0.0.1:8087".into()),
        application_id: variable("BESEDA_APPLICATION_ID")?,
        application_key: variable("BESEDA_APPLICATION_KEY")?,
        renew: Duration::from_secs(60),
    };
    // Like the scheduled job of standard #798: reconnect when the connection ends.
    loop {
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        match beseda_echo_bot::run(settings.clone(), stop).await {
            Ok(()) => tracing::info!("processing connection ended; reconnecting in 5 s"),
            Err(error) => tracing::warn!("processing connection failed: {error:#}; reconnecting in 5 s"),
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
