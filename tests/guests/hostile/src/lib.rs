//! Guests that misbehave on purpose. Each task returns `Ok` only if the sandbox let it do
//! something it should not have been able to do, so a test can tell "denied" from "allowed".

use std::hint::black_box;
use std::time::Duration;

use serde::Deserialize;
use stem_guest::TaskError;

/// Loops forever without ever checking revocation or time.
#[stem_guest::task(name = "hostile.spin")]
pub fn spin(_args: serde_json::Value) -> Result<(), TaskError> {
    let mut counter: u64 = 0;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}

#[derive(Deserialize)]
pub struct SleepArgs {
    ms: u64,
}

/// Blocks in a host call (a WASI sleep) instead of computing.
#[stem_guest::task(name = "hostile.sleep")]
pub fn sleep(args: SleepArgs) -> Result<(), TaskError> {
    std::thread::sleep(Duration::from_millis(args.ms));
    Ok(())
}

/// Allocates and touches memory until something stops it.
#[stem_guest::task(name = "hostile.memory_bomb")]
pub fn memory_bomb(_args: serde_json::Value) -> Result<usize, TaskError> {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let chunk = vec![0xA5u8; 1 << 20];
        hoard.push(black_box(chunk));
        if hoard.len() > 1 << 20 {
            return Ok(hoard.len());
        }
    }
}

// Endless on purpose: the sandbox must turn the overflow into a failed run.
#[allow(unconditional_recursion)]
#[inline(never)]
fn recurse(depth: u64, padding: [u64; 16]) -> u64 {
    let padding = black_box(padding);
    black_box(recurse(depth + 1, padding)) + padding[(depth % 16) as usize]
}

/// Recurses without end.
#[stem_guest::task(name = "hostile.stack_overflow")]
pub fn stack_overflow(_args: serde_json::Value) -> Result<u64, TaskError> {
    Ok(recurse(0, [7; 16]))
}

/// Panics with a recognisable message.
#[stem_guest::task(name = "hostile.panic")]
pub fn panic(_args: serde_json::Value) -> Result<(), TaskError> {
    panic!("hostile guest panicked on purpose");
}

#[derive(Deserialize)]
pub struct PathArgs {
    path: String,
}

/// Tries to read a file of the host.
#[stem_guest::task(name = "hostile.read_file")]
pub fn read_file(args: PathArgs) -> Result<String, TaskError> {
    std::fs::read_to_string(&args.path)
        .map_err(|e| TaskError::fail(format!("cannot read {}: {e}", args.path)))
}

/// Tries to create a file.
#[stem_guest::task(name = "hostile.write_file")]
pub fn write_file(args: PathArgs) -> Result<(), TaskError> {
    std::fs::write(&args.path, b"pwned")
        .map_err(|e| TaskError::fail(format!("cannot write {}: {e}", args.path)))
}

#[derive(Deserialize)]
pub struct ConnectArgs {
    address: String,
}

/// Tries to open a TCP connection through `wasi:sockets` directly (std's sockets need a
/// wasi-libc with socket support, which not every toolchain has).
#[stem_guest::task(name = "hostile.connect")]
pub fn connect(args: ConnectArgs) -> Result<String, TaskError> {
    use wasi::sockets::network::{IpAddressFamily, IpSocketAddress, Ipv4SocketAddress};
    let address: std::net::SocketAddrV4 = args
        .address
        .parse()
        .map_err(|e| TaskError::reject(format!("bad IPv4 address: {e}")))?;
    let denied = |step: &str, error: wasi::sockets::network::ErrorCode| {
        TaskError::fail(format!("cannot connect to {address}: {step}: {error:?}"))
    };
    let socket = wasi::sockets::tcp_create_socket::create_tcp_socket(IpAddressFamily::Ipv4)
        .map_err(|e| denied("create-tcp-socket", e))?;
    let [a, b, c, d] = address.ip().octets();
    let remote = IpSocketAddress::Ipv4(Ipv4SocketAddress {
        port: address.port(),
        address: (a, b, c, d),
    });
    socket
        .start_connect(&wasi::sockets::instance_network::instance_network(), remote)
        .map_err(|e| denied("start-connect", e))?;
    socket.subscribe().block();
    socket
        .finish_connect()
        .map(|_| format!("connected to {address}"))
        .map_err(|e| denied("finish-connect", e))
}

#[derive(Deserialize)]
pub struct EnvArgs {
    name: String,
}

/// Tries to read an environment variable of the host process.
#[stem_guest::task(name = "hostile.env")]
pub fn env(args: EnvArgs) -> Result<String, TaskError> {
    let visible = std::env::vars().count();
    std::env::var(&args.name).map_err(|e| {
        TaskError::fail(format!(
            "cannot read environment variable {}: {e} ({visible} variables visible)",
            args.name
        ))
    })
}

/// Calls `exit(3)` in the middle of a run.
#[stem_guest::task(name = "hostile.exit")]
pub fn exit(_args: serde_json::Value) -> Result<(), TaskError> {
    std::process::exit(3);
}

#[derive(Deserialize)]
pub struct FloodArgs {
    megabytes: usize,
}

/// Writes many megabytes to stdout, then succeeds.
#[stem_guest::task(name = "hostile.flood")]
pub fn flood(args: FloodArgs) -> Result<usize, TaskError> {
    let line = "x".repeat(1023);
    let lines = args.megabytes * 1024;
    for _ in 0..lines {
        println!("{line}");
    }
    Ok(lines)
}

#[derive(Deserialize)]
pub struct AllocateArgs {
    megabytes: usize,
}

/// Declares far more memory than any operator allows, then allocates and touches `megabytes`.
#[stem_guest::task(name = "hostile.greedy", memory_limit = "4GiB", max_retries = 0)]
pub fn greedy(args: AllocateArgs) -> Result<usize, TaskError> {
    let hoard = vec![0x5Au8; args.megabytes << 20];
    Ok(black_box(hoard).iter().map(|b| usize::from(*b & 1)).sum())
}

#[derive(Deserialize)]
pub struct LogFloodArgs {
    lines: usize,
    line_bytes: usize,
}

/// Logs `lines` warnings of `line_bytes` each, then succeeds with the number logged.
#[stem_guest::task(name = "hostile.log_flood")]
pub fn log_flood(ctx: &stem_guest::TaskContext, args: LogFloodArgs) -> Result<usize, TaskError> {
    let line = "w".repeat(args.line_bytes);
    for _ in 0..args.lines {
        ctx.warn(&line);
    }
    Ok(args.lines)
}

#[derive(Deserialize)]
pub struct ForkArgs {
    copies: usize,
}

/// Enqueues `copies` copies of itself, forever: a fork bomb. Succeeds once the platform
/// refuses an enqueue, saying how many it got in.
#[stem_guest::task(name = "hostile.fork_bomb", max_retries = 0)]
pub fn fork_bomb(ctx: &stem_guest::TaskContext, args: ForkArgs) -> Result<String, TaskError> {
    for made in 0..args.copies {
        if let Err(refused) = ctx.enqueue(
            "hostile.fork_bomb",
            &serde_json::json!({"copies": args.copies}),
        ) {
            return Ok(format!("refused after {made}: {refused:?}"));
        }
    }
    Ok(format!("enqueued {}", args.copies))
}

#[derive(Deserialize)]
pub struct FailArgs {
    megabytes: usize,
}

/// Fails with a message of `megabytes` megabytes.
#[stem_guest::task(name = "hostile.huge_error", max_retries = 0)]
pub fn huge_error(args: FailArgs) -> Result<(), TaskError> {
    Err(TaskError::fail("e".repeat(args.megabytes << 20)))
}

/// Rejects its input with a message holding NUL bytes, which SQL text columns refuse.
#[stem_guest::task(name = "hostile.nul_reject")]
pub fn nul_reject(_args: serde_json::Value) -> Result<(), TaskError> {
    Err(TaskError::reject("bad\0input\0"))
}

/// Returns a result of `megabytes` megabytes.
#[stem_guest::task(name = "hostile.huge_result", max_retries = 0)]
pub fn huge_result(args: FailArgs) -> Result<String, TaskError> {
    Ok("r".repeat(args.megabytes << 20))
}

#[derive(Deserialize)]
pub struct QueueArgs {
    queue: String,
}

/// Enqueues a sub-task onto `queue`; returns its id if the platform accepted the queue name.
#[stem_guest::task(name = "hostile.enqueue_to")]
pub fn enqueue_to(ctx: &stem_guest::TaskContext, args: QueueArgs) -> Result<String, TaskError> {
    let options = stem_guest::EnqueueOptions {
        queue: Some(args.queue),
        ..Default::default()
    };
    ctx.enqueue_with("hostile.sleep", &serde_json::json!({"ms": 0}), options)
}

/// Hoards `wasi:http` objects without ever sending them: headers and request bodies filled
/// as far as the host lets each grow. Returns how many it got before the host said no.
#[stem_guest::task(name = "hostile.http_hoard", max_retries = 0)]
fn http_hoard(_args: serde_json::Value) -> Result<u64, TaskError> {
    use wasi::http::types::{Fields, OutgoingRequest};
    let mut hoard = Vec::new();
    let chunk = vec![b'x'; 4096];
    for _ in 0..100_000u32 {
        let headers = Fields::new();
        for i in 0..16 {
            if headers.append(&format!("x-{i}"), &chunk[..200]).is_err() {
                break;
            }
        }
        let request = OutgoingRequest::new(headers);
        let body = request.body().map_err(|()| TaskError::fail("no body"))?;
        let stream = body.write().map_err(|()| TaskError::fail("no stream"))?;
        while let Ok(permit) = stream.check_write() {
            if permit == 0
                || stream
                    .write(&chunk[..(permit as usize).min(chunk.len())])
                    .is_err()
            {
                break;
            }
        }
        hoard.push((request, body, stream));
    }
    Ok(hoard.len() as u64)
}
