//! `beseda ctl`: every REST operation from the command line, with JSON out.
//! Operations come from the same route table as the server's router, so
//! the CLI reaches each one by its operation name (`beseda ctl operations`).

use std::io::Read;

use anyhow::{Context, bail};
use base64::Engine;
use beseda_sessions::api::{Access, routes};
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// Base URL of the server.
    #[arg(long, env = "BESEDA_CTL_SERVER", default_value = "http://127.0.0.1:8087")]
    pub server: String,
    /// Application id (privileged mode with --app-key).
    #[arg(long, env = "BESEDA_CTL_APP_ID")]
    pub app_id: Option<String>,
    /// Application key issued at registration.
    #[arg(long, env = "BESEDA_CTL_APP_KEY", hide_env_values = true)]
    pub app_key: Option<String>,
    /// In privileged mode, act as this user id.
    #[arg(long)]
    pub act_as: Option<String>,
    /// A user token instead of application credentials.
    #[arg(long, env = "BESEDA_CTL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Lists every operation with its HTTP route and the 1C method it mirrors.
    Operations,
    /// Calls one operation, e.g. `beseda ctl call CreateConversation --body '{"conversation":{"title":"x","group":true}}'`.
    Call {
        /// Operation name (see `beseda ctl operations`).
        operation: String,
        /// Path parameters, e.g. --param conversationId=0190...
        #[arg(long = "param", value_parser = parse_pair)]
        params: Vec<(String, String)>,
        /// Query parameters, e.g. --query afterSeq=10
        #[arg(long = "query", value_parser = parse_pair)]
        query: Vec<(String, String)>,
        /// JSON body; `@file` reads a file, `-` reads standard input.
        #[arg(long)]
        body: Option<String>,
    },
    /// Signs a user token with the application key (what an application server does).
    Token {
        /// The infobase user's UUID (the token's `sub`).
        #[arg(long)]
        user: String,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        full_name: String,
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: i64,
    },
    /// Operates the session registry's Raft voters (docs/deploy.md).
    Registry {
        /// gRPC URL of any voter; calls are routed to the leader.
        #[arg(long, global = true, default_value = "http://127.0.0.1:9087")]
        endpoint: String,
        /// The cluster token (`cluster.token` of the voters), if they have one;
        /// inside a Beseda pod it is already in the environment.
        #[arg(long, global = true, env = "BESEDA_CLUSTER_TOKEN", hide_env_values = true)]
        cluster_token: Option<String>,
        #[command(subcommand)]
        command: RegistryCommand,
    },
    /// Prints the newest e-mail to an address from the embedded outbox, as
    /// decoded text.
    Outbox {
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "data/outbox")]
        outbox_dir: std::path::PathBuf,
        /// Print only the code or key the mail carries (activation code,
        /// temporary code or administration key), for scripts.
        #[arg(long)]
        code: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum RegistryCommand {
    /// Leader, term, log indexes, membership and live gateways, as JSON.
    Status,
    /// Adds a node as a learner: it receives the log (or a snapshot) but
    /// does not vote until `change-membership` makes it a voter.
    AddLearner {
        #[arg(long)]
        id: u64,
        /// The new node's gRPC URL, e.g. http://registry-3.registry:9087
        #[arg(long)]
        address: String,
    },
    /// Sets the voters, e.g. --voters 1,2,3,4,5 (learners among them are promoted).
    ChangeMembership {
        #[arg(long, value_delimiter = ',', required = true)]
        voters: Vec<u64>,
    },
}

async fn registry(endpoint: &str, token: Option<&str>, command: &RegistryCommand) -> anyhow::Result<i32> {
    match command {
        RegistryCommand::Status => {
            let status = beseda_registry::admin::status(endpoint, token).await?;
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
        RegistryCommand::AddLearner { id, address } => {
            beseda_registry::admin::add_learner(endpoint, token, *id, address).await?;
            println!("node {id} ({address}) is a learner; make it a voter with change-membership");
        }
        RegistryCommand::ChangeMembership { voters } => {
            beseda_registry::admin::change_membership(endpoint, token, voters.clone()).await?;
            println!("voters are now {voters:?}");
        }
    }
    Ok(0)
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("expected name=value, got {text:?}"))
}

fn read_body(body: &str) -> anyhow::Result<String> {
    if body == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        return Ok(text);
    }
    if let Some(path) = body.strip_prefix('@') {
        return std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"));
    }
    Ok(body.to_owned())
}

/// Runs a ctl command; returns the process exit code.
pub async fn run(args: CtlArgs) -> anyhow::Result<i32> {
    match &args.command {
        CtlCommand::Operations => {
            let listing: Vec<serde_json::Value> = routes()
                .iter()
                .map(|route| {
                    serde_json::json!({
                        "operation": route.operation,
                        "method": route.method.as_str(),
                        "path": route.path,
                        "oneC": route.one_c,
                        "summary": route.summary,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&listing)?);
            Ok(0)
        }
        CtlCommand::Token { user, name, full_name, ttl_seconds } => {
            let (Some(app_id), Some(app_key)) = (&args.app_id, &args.app_key) else {
                bail!("signing a token needs --app-id and --app-key");
            };
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
            let claims = serde_json::json!({
                "iss": app_id, "aud": "beseda", "sub": user, "name": name, "fullName": full_name,
                "iat": now, "exp": now + ttl_seconds,
            });
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(app_key.as_bytes()),
            )?;
            println!("{token}");
            Ok(0)
        }
        CtlCommand::Registry { endpoint, cluster_token, command } => {
            registry(endpoint, cluster_token.as_deref(), command).await
        }
        CtlCommand::Outbox { email, outbox_dir, code } => {
            let Some(body) = beseda_routing::mail::latest_outbox_body(outbox_dir, email) else {
                eprintln!("no mail to {email} in {}", outbox_dir.display());
                return Ok(1);
            };
            if !*code {
                print!("{body}");
                return Ok(0);
            }
            match beseda_routing::mail::secret_in(&body) {
                Some(secret) => {
                    println!("{secret}");
                    Ok(0)
                }
                None => {
                    eprintln!("the newest mail to {email} carries no code:\n{body}");
                    Ok(1)
                }
            }
        }
        CtlCommand::Call { operation, params, query, body } => {
            let Some(route) = routes().iter().find(|route| route.operation.eq_ignore_ascii_case(operation)) else {
                bail!("unknown operation {operation:?}; `beseda ctl operations` lists them");
            };
            let mut path = route.path.to_owned();
            for (name, value) in params {
                path = path.replace(&format!("{{{name}}}"), value);
            }
            if let Some(missing) = path.split('/').find(|segment| segment.starts_with('{')) {
                bail!("{operation} needs --param {}=...", missing.trim_matches(|c| c == '{' || c == '}'));
            }
            let client = reqwest::Client::new();
            let url = format!("{}{}", args.server.trim_end_matches('/'), path);
            let mut request = client.request(route.method.clone(), &url).query(query);
            if route.access != Access::Public {
                if let Some(token) = &args.token {
                    request = request.bearer_auth(token);
                } else if let (Some(app_id), Some(app_key)) = (&args.app_id, &args.app_key) {
                    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{app_id}:{app_key}"));
                    request = request.header("authorization", format!("Basic {encoded}"));
                    if let Some(user) = &args.act_as {
                        request = request.header(beseda_sessions::auth::ACT_AS_HEADER, user);
                    }
                }
            }
            if route.request_message.is_some() {
                let text = match body {
                    Some(body) => read_body(body)?,
                    None => "{}".to_owned(),
                };
                request = request.header("content-type", "application/json").body(text);
            }
            let response = request.send().await.with_context(|| format!("cannot reach {url}"))?;
            let status = response.status();
            let text = response.text().await?;
            let pretty = serde_json::from_str::<serde_json::Value>(&text)
                .map(|value| serde_json::to_string_pretty(&value).unwrap_or(text.clone()))
                .unwrap_or(text);
            if status.is_success() {
                println!("{pretty}");
                Ok(0)
            } else {
                eprintln!("{pretty}");
                Ok(1)
            }
        }
    }
}
