//! `stem-host dashboard`: the web dashboard ([`crate::dashboard`]) until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::Connections;
use crate::dashboard::{self, Dashboard};

#[derive(Args)]
pub struct DashboardArgs {
    /// Where to serve it. A non-loopback address needs a token.
    #[arg(
        long,
        env = "STEM_DASHBOARD_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    listen: SocketAddr,
    /// Needed to see any page and to make any change (at least 16 characters); without one
    /// the dashboard is read-only and listens on loopback only.
    #[arg(
        long,
        env = "STEM_DASHBOARD_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
}

pub async fn run(args: DashboardArgs, connections: &Connections) -> anyhow::Result<ExitCode> {
    dashboard::check_listen(args.listen, args.token.as_deref())?;
    let parts = Dashboard {
        broker: connections.broker().await?,
        backend: connections.backend().await?,
        revokes: connections.revokes().await?,
        schedules: connections.schedules().await?,
        canvases: connections.canvases().await?,
        channels: connections.channels(),
        token: args.token.clone(),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let access = match args.token {
        Some(_) => "log in with the token",
        None => "read-only: no token, so no changes can be made",
    };
    // Said once listening, so a script can open the page after this line.
    eprintln!("dashboard at http://{addr}/ ({access}; Ctrl-C to stop)");
    let running = dashboard::serve(parts, listener);
    super::terminate_or_interrupt().await;
    running.stop();
    Ok(ExitCode::SUCCESS)
}
