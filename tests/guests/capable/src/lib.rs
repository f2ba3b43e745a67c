//! Tasks that reach past the sandbox, each declaring a different set of capabilities, so the
//! tests can grant or withhold them and see what a run gets.

use serde::Deserialize;
use serde_json::{Value, json};
use stem_guest::{TaskContext, TaskError, http};

#[derive(Deserialize)]
struct Fetch {
    url: String,
}

fn fetch(url: &str) -> Result<Value, TaskError> {
    let response = http::get(url)?;
    Ok(json!({
        "status": response.status,
        "body": response.text()?,
        "url": response.url,
    }))
}

/// GETs `url` (any port of 127.0.0.1 is declared) and returns the status and body.
#[stem_guest::task(name = "capable.fetch", outbound = ["http://127.0.0.1:*"], time_limit = "20s")]
fn fetch_local(args: Fetch) -> Result<Value, TaskError> {
    fetch(&args.url)
}

/// The same request from a task that declares no outbound access.
#[stem_guest::task(name = "capable.fetch-undeclared")]
fn fetch_undeclared(args: Fetch) -> Result<Value, TaskError> {
    fetch(&args.url)
}

/// Declares every http host and port: only grants naming a host exactly open private
/// addresses.
#[stem_guest::task(name = "capable.fetch-anywhere", outbound = ["http://*:*"])]
fn fetch_anywhere(args: Fetch) -> Result<Value, TaskError> {
    fetch(&args.url)
}

/// Reads API_TOKEN, logs it (the host masks it), sends it to `url` if given, and returns its
/// length and the token itself (masked in the result).
#[stem_guest::task(name = "capable.secret", secrets = ["API_TOKEN"], outbound = ["http://127.0.0.1:*"])]
fn secret(ctx: &TaskContext, args: Value) -> Result<Value, TaskError> {
    let token = ctx.secret("API_TOKEN")?;
    ctx.info(&format!("using token {token}"));
    if let Some(url) = args.get("url").and_then(Value::as_str) {
        http::Request::get(url)
            .header("authorization", &format!("Bearer {token}"))
            .send()?;
    }
    println!("stdout sees {token}");
    Ok(json!({ "length": token.len(), "echo": token }))
}

/// Declares API_TOKEN too, but is not granted it in the tests.
#[stem_guest::task(name = "capable.secret-ungranted", secrets = ["API_TOKEN"])]
fn secret_ungranted(ctx: &TaskContext, _args: Value) -> Result<Value, TaskError> {
    Ok(json!({ "token": ctx.secret("API_TOKEN")? }))
}

/// Asks for API_TOKEN without declaring it.
#[stem_guest::task(name = "capable.secret-undeclared")]
fn secret_undeclared(ctx: &TaskContext, _args: Value) -> Result<Value, TaskError> {
    Ok(json!({ "token": ctx.secret("API_TOKEN")? }))
}

/// Reads /in/input.txt, writes /out/output.txt, and reports what else it could touch.
#[stem_guest::task(name = "capable.files", dirs = ["/in:ro", "/out:rw"])]
fn files(_args: Value) -> Result<Value, TaskError> {
    let input = std::fs::read_to_string("/in/input.txt").map_err(TaskError::fail)?;
    std::fs::write("/out/output.txt", input.to_uppercase()).map_err(TaskError::fail)?;
    let outcome = |result: std::io::Result<()>| match result {
        Ok(()) => "allowed".to_string(),
        Err(error) => format!("denied: {error}"),
    };
    Ok(json!({
        "input": input,
        "write_to_read_only": outcome(std::fs::write("/in/new.txt", "x")),
        "read_outside": outcome(std::fs::read("/etc/hostname").map(drop)),
        "escape_by_dotdot": outcome(std::fs::read("/in/../etc/hostname").map(drop)),
    }))
}

/// Declares one of each capability and uses none: what a grant costs a run by itself
/// (`bench runtime --task capable.idle --grant ...`).
#[stem_guest::task(
    name = "capable.idle",
    outbound = ["http://127.0.0.1:*"],
    secrets = ["API_TOKEN"],
    dirs = ["/in:ro"]
)]
fn idle(_args: Value) -> Result<Value, TaskError> {
    Ok(json!({}))
}
