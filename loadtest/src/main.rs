//! `beseda-loadtest`: see `beseda-loadtest --help` and docs/loadtest.md.

use beseda_loadtest::scenarios;
use clap::{Parser, Subcommand};

/// A load generator for Beseda. Each scenario sets up its own application,
/// users and conversations through the API, drives the real client
/// protocol open-loop for a bounded time, checks that nothing was lost,
/// duplicated or reordered, and writes result.json, report.html and PNG
/// plots to --report-dir. The exit status is 1 when the run failed its
/// checks.
///
/// `beseda-loadtest file <scenario.toml>` runs a scenario described in a
/// file: `scenario = "fanout"` and the flags as keys (`members = 500`,
/// `target = ["http://127.0.0.1:8087"]`, `relay = true`).
#[derive(Parser)]
#[command(name = "beseda-loadtest", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Group fan-out: M members online in one conversation, K senders at R messages/s in all.
    Fanout(scenarios::fanout::Fanout),
    /// One-on-one chat pairs, both people online, each sending at a rate.
    Pairs(scenarios::pairs::Pairs),
    /// Webhook ingest: createMessage commands to a webhook integration's connection point at a rate, each
    /// checked stored exactly once.
    ///
    /// Sets up a webhook integration (default members: --members users), two integration users and
    /// --conversations external conversations (createConversation), then POSTs createMessage commands with
    /// unique extIds at --rate per second in all, open loop, at most --concurrency outstanding. Latency: from
    /// when a command was due (not when it could start) to its HTTP answer. Any answer but 200 is an error and
    /// the command counts as lost; at the end GetMessages must show every accepted command stored exactly
    /// once, as many messages per conversation as commands accepted. Figure: commands_per_second.
    Webhook(scenarios::webhook::Webhook),
    /// Bot echo round trip: people in one-on-ones with an echo bot served by the run's own processing
    /// connection; latency from send to the echo's receipt.
    ///
    /// The run is the application: it opens the bot processing connection (/bots/v1/processing) with a
    /// predefined bot of type --bot-type and answers each message event by posting "echo " + the text
    /// through the REST API as the bot's user, then acknowledges it. It is also --people people online over
    /// WebSocket, each in a one-on-one with the bot, sending --rate messages per second in all (open loop, at
    /// most --concurrency awaiting their echo). Latency: from when a message was due to when its sender
    /// received the echo (the full bot round trip). Every message must be echoed to its sender exactly once,
    /// in order; a failed echo post or a closed processing connection fails the run. Figure:
    /// echoes_per_second.
    BotEcho(scenarios::bot_echo::BotEcho),
    /// Listing and paging: GetMessages and GetConversations pages at a rate, each page checked.
    ///
    /// Seeds one conversation with --messages messages (--seed-senders concurrent senders through the API)
    /// and --conversations conversations of one user, then at --rate requests per second (open loop, at most
    /// --concurrency outstanding) alternately asks for a GetMessages page and a GetConversations page of
    /// --page-size, each starting after a random item. Latency: from when a request was due to its whole
    /// answer. Nothing changes during the load, so every page must be exactly the expected ids, and a full
    /// walk before and after must return every message (in seq order) and conversation once. Figure:
    /// requests_per_second.
    Listing(scenarios::listing::Listing),
    /// Connect storm: new connections per second, ramped up step by step until the server fails.
    ///
    /// Opens connections (TCP, WebSocket, Hello, Welcome with one of --users user tokens) open loop at
    /// --start-rate per second, --step more every --step-seconds, up to --max-rate, holding them all; the
    /// ramp stops at the first step where more than --max-failure-percent of the attempts failed or the
    /// connect p99 exceeded --max-connect-p99-ms, at --max-connections attempts, or after --duration-seconds.
    /// Connect latency: from when an attempt was due to its Welcome (or failure). In this scenario "sent"
    /// counts attempts and "delivered" counts connections welcomed; failed attempts are connection failures,
    /// not losses. The run fails if no step passed, if attempts failed in steps below the sustained rate, or
    /// if the server closed a held connection. Figures: connections_per_second_sustained (highest step rate
    /// that passed), peak_connections, connect_p99_ms (at that step).
    ConnectStorm(scenarios::connect_storm::ConnectStorm),
    /// Idle hold: N authenticated connections held open; server memory per connection.
    ///
    /// Opens --connections connections (one of --users user tokens each) at --connect-rate per second, open
    /// loop, then holds them all for --duration-seconds, answering the server's pings. "Delivered" counts
    /// connections welcomed; the latency is the connect latency. The run fails if any connection could not
    /// be opened or the server closed any held one. Figures: connections_held and, with --server-pid,
    /// server_rss_bytes_before, server_rss_bytes_after and server_bytes_per_connection.
    Idle(scenarios::idle::Idle),
    /// Reconnect churn with resume: clients reconnect over and over and must still get every message once.
    ///
    /// --clients members are subscribed to one group conversation where --senders further members send
    /// --rate messages per second in all (open loop). Each client reconnects every --reconnect-every-seconds
    /// (jittered 0.5-1.5x) and resumes with Subscribe{afterSeq = the last seq it processed}; across its
    /// reconnects it must receive every message exactly once, in order. Latency: from when a message was
    /// due to its receipt (replayed ones include the time away). The run fails if anything was lost,
    /// duplicated or reordered, a reconnect attempt failed, or no client reconnected. Figures: reconnect_p50_ms and
    /// reconnect_p99_ms (from starting the reconnect to the subscribed answer, replay included),
    /// reconnects_per_second.
    Churn(scenarios::churn::Churn),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BESEDA_LOADTEST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = match std::env::args().nth(1).as_deref() {
        Some("file") => {
            let path = std::env::args()
                .nth(2)
                .ok_or_else(|| anyhow::anyhow!("usage: beseda-loadtest file <scenario.toml>"))?;
            let text =
                std::fs::read_to_string(&path).map_err(|error| anyhow::anyhow!("cannot read {path}: {error}"))?;
            Cli::try_parse_from(beseda_loadtest::scenario_file::arguments(&text)?)?
        }
        _ => Cli::parse(),
    };
    let result = match cli.scenario {
        Scenario::Fanout(scenario) => scenarios::fanout::run(scenario).await?,
        Scenario::Pairs(scenario) => scenarios::pairs::run(scenario).await?,
        Scenario::Webhook(scenario) => scenarios::webhook::run(scenario).await?,
        Scenario::BotEcho(scenario) => scenarios::bot_echo::run(scenario).await?,
        Scenario::Listing(scenario) => scenarios::listing::run(scenario).await?,
        Scenario::ConnectStorm(scenario) => scenarios::connect_storm::run(scenario).await?,
        Scenario::Idle(scenario) => scenarios::idle::run(scenario).await?,
        Scenario::Churn(scenario) => scenarios::churn::run(scenario).await?,
    };
    println!("{}", serde_json::to_string_pretty(&result.totals)?);
    println!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        result.latency_ms.p50,
        result.latency_ms.p90,
        result.latency_ms.p99,
        result.latency_ms.p999,
        result.latency_ms.max
    );
    for (name, value) in &result.figures {
        println!("{name}: {value:.1}");
    }
    if result.passed {
        println!("PASSED");
        Ok(())
    } else {
        for failure in &result.failures {
            println!("FAILED: {failure}");
        }
        std::process::exit(1);
    }
}
