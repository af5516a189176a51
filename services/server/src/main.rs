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
    /// Runs the server: by default every service in one process on the
    /// embedded defaults; with --role, the given services of a cluster.
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
        /// Services to run: gateway, routing, bots, registry or all;
        /// repeat or separate with commas (overrides the config; docs/deploy.md).
        #[arg(long = "role", value_delimiter = ',')]
        roles: Vec<String>,
        /// Address for internal gRPC (overrides the config).
        #[arg(long)]
        grpc_listen: Option<std::net::SocketAddr>,
    },
    /// Calls the API from the command line.
    Ctl(beseda::ctl::CtlArgs),
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

/// What `beseda serve` was given on its command line.
struct ServeFlags {
    config: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
    data_dir: Option<PathBuf>,
    roles: Vec<String>,
    grpc_listen: Option<std::net::SocketAddr>,
}

async fn serve(flags: ServeFlags) -> anyhow::Result<()> {
    let ServeFlags { config, listen, data_dir, roles, grpc_listen } = flags;
    let environment: Vec<(String, String)> = std::env::vars().collect();
    let mut config = beseda::config::NodeConfig::load(config.as_deref(), &environment)?;
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    if let Some(data_dir) = data_dir {
        config.server.data_dir = data_dir;
    }
    if !roles.is_empty() {
        config.server.roles = beseda::roles::Roles::parse(&roles.join(","))?;
    }
    if let Some(grpc_listen) = grpc_listen {
        config.server.grpc_listen = grpc_listen;
    }
    config.validate()?;
    // Logs, and traces when an OTLP endpoint is configured (docs/observability.md).
    let telemetry = beseda::telemetry::init(&config)?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on {}: {error}", config.server.listen))?;
    let address = listener.local_addr()?;
    use beseda::roles::Role;
    let roles = &config.server.roles;
    println!("Beseda {} is starting ({roles})", env!("CARGO_PKG_VERSION"));
    if roles.has(Role::Gateway) {
        println!("  HTTP API:   http://{address}/api/v1   (OpenAPI: http://{address}/api/openapi.json)");
        println!("  WebSocket:  ws://{address}/ws");
    }
    println!("  Health:     http://{address}/rs/health    Metrics: http://{address}/metrics");
    if roles.serves_grpc() {
        println!("  gRPC:       {} (internal)", config.server.grpc_listen);
    }
    if roles.uses_data_dir() {
        println!("  Data:       {}", config.server.data_dir.display());
    }
    if roles.has(Role::Routing) {
        match &config.mail.smtp_url {
            Some(_) => println!("  Mail:       through the configured SMTP relay"),
            None => println!("  Mail:       written to {} (no SMTP relay configured)", config.outbox_dir().display()),
        }
    }
    if roles.has(Role::Gateway) {
        println!("  No administrator password exists: applications register by e-mail (docs/api.md, Registration).");
    }
    let served = beseda::app::run(config, listener, shutdown_signal()).await;
    telemetry.shutdown().await;
    served
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
            Command::Serve { config, listen, data_dir, roles, grpc_listen } => {
                serve(ServeFlags { config, listen, data_dir, roles, grpc_listen }).await.map(|()| 0)
            }
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
