//! `beseda serve` runs a node; `beseda ctl` scripts its API.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "beseda", version, about = "Beseda collaboration server: messaging for 1C:Enterprise applications")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the server (every service in one process on the embedded defaults).
    Serve {
        /// TOML configuration file (optional; see docs/configuration.md).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address for HTTP, WebSocket, health and metrics (overrides the config).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Data directory (overrides the config).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Calls the API from the command line.
    Ctl(beseda::ctl::CtlArgs),
}

fn init_logging(format: &str, filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour only for a person at a terminal, never in files or log collectors.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

async fn serve(
    config: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let environment: Vec<(String, String)> =
        std::env::vars().filter(|(name, _)| !name.starts_with("BESEDA_CTL_")).collect();
    let mut config = beseda::config::NodeConfig::load(config.as_deref(), &environment)?;
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    if let Some(data_dir) = data_dir {
        config.server.data_dir = data_dir;
    }
    config.validate()?;
    init_logging(&config.log.format, &config.log.filter);
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on {}: {error}", config.server.listen))?;
    let address = listener.local_addr()?;
    println!("Beseda {} is starting", env!("CARGO_PKG_VERSION"));
    println!("  HTTP API:   http://{address}/api/v1   (OpenAPI: http://{address}/api/openapi.json)");
    println!("  WebSocket:  ws://{address}/ws");
    println!("  Health:     http://{address}/rs/health    Metrics: http://{address}/metrics");
    println!("  Data:       {}", config.server.data_dir.display());
    match &config.mail.smtp_url {
        Some(_) => println!("  Mail:       through the configured SMTP relay"),
        None => println!("  Mail:       written to {} (no SMTP relay configured)", config.outbox_dir().display()),
    }
    println!("  No administrator password exists: applications register by e-mail (docs/api.md, Registration).");
    beseda::app::run(config, listener, shutdown_signal()).await
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve { config, listen, data_dir } => serve(config, listen, data_dir).await.map(|()| 0),
            Command::Ctl(args) => beseda::ctl::run(args).await,
        }
    });
    match result {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
