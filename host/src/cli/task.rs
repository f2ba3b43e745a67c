//! `stem-host task ...`: upload components and list the tasks they declare; inspect a component
//! file and run one invocation locally.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::Connections;
use super::units::{compact_duration, human_duration, parse_duration, parse_size};
use crate::capabilities::{Capabilities, Grant, RunCapabilities, check_secret_name};
use crate::components;
use crate::runtime::{
    RunError, RunHandle, RunLimits, SubTaskRequest, TaskComponent, TaskHooks, TaskInfo,
};
use crate::signing::ComponentSigner;
use crate::stores::registry::TaskVersion;
use crate::task::{Invocation, LogLevel, TaskDefinition};

#[derive(Subcommand)]
pub enum TaskCommand {
    /// Upload a component: validate it, store it by sha256 and map each task it declares to it.
    ///
    /// Uploading a changed component makes a new version of its tasks; running workers pick it
    /// up within a second. Uploading the same file again changes nothing.
    Upload {
        /// The component (.wasm) to upload.
        file: PathBuf,
        /// Sign the component's digest with this Ed25519 private key file (`ID:BASE64`, from
        /// `signing keygen --algorithm ed25519 --out DIR`), for workers started with
        /// `--trusted-keys`.
        #[arg(long, value_name = "KEY_FILE")]
        sign: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Grant a task capabilities. A run gets what the task declares and is granted, nothing
    /// more; grants belong to the task name and carry over to new versions.
    Grant(GrantArgs),
    /// Take grants back from a task; runs that start afterwards (within a second) lose them.
    RevokeGrant(GrantArgs),
    /// List the registered tasks, with their current version and component.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one registered task: its options, capabilities (declared, granted, effective),
    /// signatures and every version. Secret values are never shown, only names.
    Show {
        /// The task name, e.g. hello.add.
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the tasks a component declares, with their default options.
    Inspect {
        /// The component (.wasm) to inspect.
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run one invocation of a task locally, with no broker and no result backend.
    ///
    /// Prints the JSON result on stdout and exits 0, or prints why the run failed and exits 1.
    /// Guest logs and progress go to stderr. Sub-tasks the guest enqueues are listed, not run.
    Run(RunArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// The component (.wasm) that implements the task.
    file: PathBuf,
    /// The task name, e.g. hello.add.
    name: String,
    /// JSON arguments.
    #[arg(long, default_value = "{}", conflicts_with = "args_file")]
    args: String,
    /// Read the JSON arguments from a file.
    #[arg(long, value_name = "FILE")]
    args_file: Option<PathBuf>,
    /// Memory cap (e.g. 64MiB); defaults to the task's own, else 128MiB.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    memory_limit: Option<u64>,
    /// Hard time limit (e.g. 30s); defaults to the task's own, else 5m.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    time_limit: Option<Duration>,
    /// Soft time limit the guest can observe (e.g. 10s).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    soft_time_limit: Option<Duration>,
    /// The attempt number the guest sees (1 is the first run).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    attempt: u32,
    /// Grant the run this, as `task grant` would (`outbound URL_PATTERN`, `secret NAME`,
    /// `dir HOST_PATH:GUEST_PATH:ro|rw`); repeatable. Secrets come from STEM_SECRET_NAME.
    #[arg(long = "grant", value_name = "GRANT")]
    grants: Vec<String>,
    /// Print one JSON object with the outcome instead of the bare result.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct GrantArgs {
    /// The task name, e.g. mail.send.
    name: String,
    /// An outbound URL pattern, `scheme://host[:port]`: `https://api.example.com`,
    /// `http://127.0.0.1:8080`, `https://*.example.com`, `*://example.com:*`. Private,
    /// loopback and link-local addresses need a pattern naming the host exactly.
    #[arg(long, value_name = "URL_PATTERN")]
    outbound: Vec<String>,
    /// A secret name; the worker reads its value from STEM_SECRET_NAME or its secrets
    /// directory.
    #[arg(long, value_name = "NAME")]
    secret: Vec<String>,
    /// A directory: HOST_PATH:GUEST_PATH:ro or :rw (rw only takes effect where the task
    /// declares rw too).
    #[arg(long, value_name = "HOST_PATH:GUEST_PATH:MODE")]
    dir: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl GrantArgs {
    fn grants(&self) -> anyhow::Result<Vec<Grant>> {
        let mut grants = Vec::new();
        for pattern in &self.outbound {
            grants.push(Grant::Outbound(
                pattern
                    .parse()
                    .with_context(|| format!("invalid --outbound `{pattern}`"))?,
            ));
        }
        for name in &self.secret {
            check_secret_name(name).with_context(|| format!("invalid --secret `{name}`"))?;
            grants.push(Grant::Secret(name.clone()));
        }
        for dir in &self.dir {
            grants.push(Grant::dir(dir).with_context(|| format!("invalid --dir `{dir}`"))?);
        }
        if grants.is_empty() {
            bail!("name at least one --outbound, --secret or --dir");
        }
        Ok(grants)
    }
}

pub async fn run(command: TaskCommand, connections: &Connections) -> anyhow::Result<ExitCode> {
    match command {
        TaskCommand::Upload { file, sign, json } => {
            upload(&file, sign.as_deref(), json, connections).await
        }
        TaskCommand::Grant(args) => grant(args, true, connections).await,
        TaskCommand::RevokeGrant(args) => grant(args, false, connections).await,
        TaskCommand::List { json } => list(json, connections).await,
        TaskCommand::Show { name, json } => show(&name, json, connections).await,
        TaskCommand::Inspect { file, json } => inspect(&file, json, connections).await,
        TaskCommand::Run(args) => run_task(args, connections).await,
    }
}

async fn upload(
    file: &Path,
    sign: Option<&Path>,
    json: bool,
    connections: &Connections,
) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let signer = match sign {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the signing key {}", path.display()))?;
            Some(ComponentSigner::parse(&text)?)
        }
        None => None,
    };
    let runtime = connections.sandbox(|_| {})?;
    let registry = connections.registry().await?;
    let upload = components::upload(registry.as_ref(), &runtime, bytes, signer.as_ref())
        .await
        .with_context(|| format!("cannot upload {}", file.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&upload)?);
        return Ok(ExitCode::SUCCESS);
    }
    let size = upload.size;
    let stored = if upload.new_component {
        "stored"
    } else {
        "already stored"
    };
    println!(
        "{}  sha256:{}  {size} bytes, {stored}",
        file.display(),
        upload.digest
    );
    if let Some(key) = &upload.signed_by {
        println!("signed by key `{key}`");
    }
    print_versions(&upload.tasks);
    for task in &upload.tasks {
        let declared = &task.definition.capabilities;
        if !declared.is_empty() {
            println!(
                "{} declares {}; it gets only what is also granted (`stem-host task show {}`)",
                task.name,
                describe_capabilities(declared),
                task.name
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn grant(args: GrantArgs, add: bool, connections: &Connections) -> anyhow::Result<ExitCode> {
    let grants = args.grants()?;
    let registry = connections.registry().await?;
    let mut changed = Vec::new();
    for grant in &grants {
        let text = grant.to_string();
        let did = if add {
            registry.grant(&args.name, &text).await?
        } else {
            registry.revoke_grant(&args.name, &text).await?
        };
        changed.push((text, did));
    }
    let current = registry.task(&args.name).await?;
    let all = components::parse_grants(&args.name, &registry.grants(&args.name).await?);
    let declared = current
        .as_ref()
        .map(|v| v.definition.capabilities.clone())
        .unwrap_or_default();
    let effective = RunCapabilities::intersect(&declared, &all);
    if args.json {
        let report = json!({
            "name": args.name,
            "changed": changed.iter().filter(|(_, did)| *did).map(|(t, _)| t).collect::<Vec<_>>(),
            "unchanged": changed.iter().filter(|(_, did)| !*did).map(|(t, _)| t).collect::<Vec<_>>(),
            "grants": all.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "registered": current.is_some(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    for (text, did) in &changed {
        let what = match (add, did) {
            (true, true) => "granted",
            (true, false) => "already granted",
            (false, true) => "revoked",
            (false, false) => "was not granted",
        };
        println!("{}: {what}: {text}", args.name);
    }
    if current.is_none() {
        eprintln!(
            "note: no task named `{}` is registered yet; the grants apply once one is uploaded",
            args.name
        );
    } else if add {
        for grant in &grants {
            if !effective_covers(&effective, &declared, grant) {
                eprintln!(
                    "note: `{grant}` has no effect until a version of `{}` declares it",
                    args.name
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a local run (`task run`, `bench runtime`) gets from its `--grant` flags: the task's
/// declarations intersected with them, as a worker would with the registry's grants.
pub(super) fn granted_by_flags(
    declared: &Capabilities,
    flags: &[String],
) -> anyhow::Result<RunCapabilities> {
    let grants = flags
        .iter()
        .map(|text| text.parse::<Grant>())
        .collect::<Result<Vec<_>, _>>()
        .context("invalid --grant")?;
    Ok(RunCapabilities::intersect(declared, &grants))
}

/// Whether a grant opens anything for the task as it declares itself now.
fn effective_covers(effective: &RunCapabilities, declared: &Capabilities, grant: &Grant) -> bool {
    match grant {
        Grant::Secret(name) => effective.secrets.contains(name),
        Grant::Dir { guest, .. } => effective.dirs.iter().any(|d| &d.guest == guest),
        // Whether two patterns overlap is not worth guessing: only say so when nothing is
        // declared at all.
        Grant::Outbound(_) => !declared.outbound.is_empty() && !effective.outbound.is_empty(),
    }
}

fn describe_capabilities(capabilities: &Capabilities) -> String {
    let mut parts = Vec::new();
    if !capabilities.outbound.is_empty() {
        parts.push(format!("outbound {}", capabilities.outbound.join(", ")));
    }
    if !capabilities.secrets.is_empty() {
        parts.push(format!("secrets {}", capabilities.secrets.join(", ")));
    }
    if !capabilities.dirs.is_empty() {
        parts.push(format!("dirs {}", capabilities.dirs.join(", ")));
    }
    parts.join("; ")
}

async fn list(json: bool, connections: &Connections) -> anyhow::Result<ExitCode> {
    let tasks = connections.registry().await?.tasks().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&tasks)?);
    } else if tasks.is_empty() {
        eprintln!("no tasks registered yet: upload a component with `stem-host task upload FILE`");
    } else {
        print_versions(&tasks);
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(name: &str, json: bool, connections: &Connections) -> anyhow::Result<ExitCode> {
    let registry = connections.registry().await?;
    let versions = registry.versions(name).await?;
    let Some(current) = versions.last() else {
        bail!(
            "unknown task `{name}`: no uploaded component declares it (see `stem-host task list`)"
        );
    };
    let grants = components::parse_grants(name, &registry.grants(name).await?);
    let declared = &current.definition.capabilities;
    let effective = RunCapabilities::intersect(declared, &grants);
    let signatures: Vec<String> = registry
        .signatures(&current.digest)
        .await?
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    let grant_texts: Vec<String> = grants.iter().map(ToString::to_string).collect();
    let effective_dirs: Vec<String> = effective
        .dirs
        .iter()
        .map(|d| {
            let mode = if d.writable { "rw" } else { "ro" };
            format!("{}:{}:{mode}", d.host.display(), d.guest)
        })
        .collect();
    if json {
        let report = json!({
            "name": name,
            "current": current,
            "versions": versions,
            "grants": grant_texts,
            "effective": {
                "outbound": !effective.outbound.is_empty(),
                "secrets": effective.secrets,
                "dirs": effective_dirs,
            },
            "signed_by": signatures,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{name}");
    if let Some(description) = &current.definition.description {
        println!("  {description}");
    }
    println!(
        "  options: {}",
        describe_options(&current.definition).join(" ")
    );
    let none = || "(none)".to_string();
    println!(
        "  declares: {}",
        Some(describe_capabilities(declared))
            .filter(|d| !d.is_empty())
            .unwrap_or_else(none)
    );
    println!(
        "  granted: {}",
        Some(grant_texts.join(", "))
            .filter(|g| !g.is_empty())
            .unwrap_or_else(none)
    );
    let mut effective_parts = Vec::new();
    if !effective.outbound.is_empty() {
        effective_parts.push("outbound where a declared and a granted pattern both match".into());
    }
    if !effective.secrets.is_empty() {
        let names: Vec<&str> = effective.secrets.iter().map(String::as_str).collect();
        effective_parts.push(format!("secrets {}", names.join(", ")));
    }
    if !effective_dirs.is_empty() {
        effective_parts.push(format!("dirs {}", effective_dirs.join(", ")));
    }
    println!(
        "  effective: {}",
        Some(effective_parts.join("; "))
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "(nothing: runs only compute)".to_string())
    );
    if !signatures.is_empty() {
        println!("  signed by: {}", signatures.join(", "));
    }
    println!("  versions:");
    for version in versions.iter().rev() {
        println!(
            "    v{:<4} sha256:{}  uploaded {}",
            version.version, version.digest, version.uploaded_at
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_versions(tasks: &[TaskVersion]) {
    let width = tasks.iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
    println!("{:<width$}  VERSION  COMPONENT     OPTIONS", "TASK");
    for task in tasks {
        println!(
            "{:<width$}  v{:<7} {}  {}",
            task.name,
            task.version,
            &task.digest[..12.min(task.digest.len())],
            describe_options(&task.definition).join(" ")
        );
    }
}

/// Loads a component file into a sandbox whose per-run memory ceiling is at least
/// `memory_bytes`.
async fn load(
    file: &Path,
    connections: &Connections,
    memory_bytes: Option<u64>,
) -> anyhow::Result<Arc<TaskComponent>> {
    let runtime = connections.sandbox(|config| {
        config.max_memory_bytes = config.max_memory_bytes.max(memory_bytes.unwrap_or(0));
    })?;
    let path = file.to_path_buf();
    tokio::task::spawn_blocking(move || runtime.load_file(&path))
        .await?
        .with_context(|| format!("cannot load {}", file.display()))
}

async fn inspect(file: &Path, json: bool, connections: &Connections) -> anyhow::Result<ExitCode> {
    let component = load(file, connections, None).await?;
    let definitions = component
        .describe()
        .await
        .with_context(|| format!("cannot load {}", file.display()))?;
    if json {
        let report = json!({
            "file": file.display().to_string(),
            "digest": component.digest(),
            "tasks": definitions,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}  sha256:{}", file.display(), component.digest());
        print_definitions(definitions);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_definitions(definitions: &[TaskDefinition]) {
    let width = definitions
        .iter()
        .map(|d| d.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!("{:<width$}  OPTIONS", "TASK");
    for definition in definitions {
        let options = describe_options(definition);
        println!("{:<width$}  {}", definition.name, options.join(" "));
        if !definition.capabilities.is_empty() {
            let declared = describe_capabilities(&definition.capabilities);
            println!("{:<width$}  declares: {declared}", "");
        }
        if let Some(description) = &definition.description {
            println!("{:<width$}  {description}", "");
        }
    }
}

fn describe_options(definition: &TaskDefinition) -> Vec<String> {
    let o = &definition.options;
    let ms = |v: u64| compact_duration(Duration::from_millis(v));
    let mut out = Vec::new();
    if let Some(v) = &o.queue {
        out.push(format!("queue={v}"));
    }
    if let Some(v) = o.priority {
        out.push(format!("priority={v}"));
    }
    if let Some(v) = o.max_retries {
        out.push(format!("max_retries={v}"));
    }
    if let Some(v) = o.retry_backoff_ms {
        out.push(format!("retry_backoff={}", ms(v)));
    }
    if let Some(v) = o.retry_backoff_max_ms {
        out.push(format!("retry_backoff_max={}", ms(v)));
    }
    if let Some(v) = o.retry_jitter {
        out.push(format!("retry_jitter={v}"));
    }
    if let Some(v) = o.soft_time_limit_ms {
        out.push(format!("soft_time_limit={}", ms(v)));
    }
    if let Some(v) = o.hard_time_limit_ms {
        out.push(format!("time_limit={}", ms(v)));
    }
    if let Some(v) = &o.rate_limit {
        out.push(format!("rate_limit={v}"));
    }
    if let Some(v) = o.memory_limit_bytes {
        out.push(format!("memory_limit={}MiB", v >> 20));
    }
    if let Some(v) = &o.args_encoder {
        out.push(format!("args_encoder={v}"));
    }
    if let Some(v) = &o.result_encoder {
        out.push(format!("result_encoder={v}"));
    }
    if out.is_empty() {
        out.push("(defaults)".to_string());
    }
    out
}

/// Guest logs and progress on stderr; sub-tasks and canvases recorded, not run.
#[derive(Default)]
struct LocalHooks {
    subtasks: Mutex<Vec<(String, SubTaskRequest)>>,
    /// Each canvas's id and JSON spec.
    canvases: Mutex<Vec<(String, String)>>,
}

#[async_trait::async_trait]
impl TaskHooks for LocalHooks {
    fn log(&self, task: &TaskInfo, level: LogLevel, message: &str) {
        let level = format!("{level:?}").to_lowercase();
        eprintln!("[{}] {level}: {message}", task.name);
    }

    fn progress(&self, task: &TaskInfo, percent: u8, message: &str) {
        eprintln!("[{}] progress {percent}%: {message}", task.name);
    }

    async fn enqueue(&self, _parent: &TaskInfo, request: SubTaskRequest) -> Result<String, String> {
        let id = uuid::Uuid::new_v4().to_string();
        self.subtasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id.clone(), request));
        Ok(id)
    }

    async fn submit_canvas(&self, _parent: &TaskInfo, spec: String) -> Result<String, String> {
        let id = uuid::Uuid::new_v4().to_string();
        self.canvases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id.clone(), spec));
        Ok(id)
    }
}

async fn run_task(args: RunArgs, connections: &Connections) -> anyhow::Result<ExitCode> {
    let raw_args = match &args.args_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read arguments from {}", path.display()))?,
        None => args.args.clone(),
    };
    if let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(&raw_args) {
        bail!("the arguments are not valid JSON ({error}): {raw_args}");
    }
    let component = load(&args.file, connections, args.memory_limit).await?;
    let definitions = component
        .describe()
        .await
        .with_context(|| format!("cannot load {}", args.file.display()))?;
    let Some(definition) = definitions.iter().find(|d| d.name == args.name) else {
        let names: Vec<&str> = definitions.iter().map(|d| d.name.as_str()).collect();
        bail!(
            "{} does not declare task `{}`; it declares: {}",
            args.file.display(),
            args.name,
            names.join(", ")
        );
    };
    let defaults = RunLimits::default();
    let limits = RunLimits {
        memory_bytes: args
            .memory_limit
            .or(definition.options.memory_limit_bytes)
            .unwrap_or(defaults.memory_bytes),
        hard_time_limit: args
            .time_limit
            .or(definition.options.hard_time_limit())
            .unwrap_or(defaults.hard_time_limit),
        soft_time_limit: args
            .soft_time_limit
            .or(definition.options.soft_time_limit()),
        ..defaults
    };
    let invocation = Invocation {
        attempt: args.attempt,
        ..Invocation::new(&args.name, raw_args)
    };
    let capabilities = granted_by_flags(&definition.capabilities, &args.grants)?;
    let hooks = Arc::new(LocalHooks::default());
    let started = Instant::now();
    let outcome = component
        .run(
            &invocation,
            limits,
            &capabilities,
            hooks.clone(),
            &RunHandle::new(),
        )
        .await;
    let elapsed = started.elapsed();
    let subtasks = std::mem::take(&mut *hooks.subtasks.lock().unwrap_or_else(|p| p.into_inner()));
    let canvases = std::mem::take(&mut *hooks.canvases.lock().unwrap_or_else(|p| p.into_inner()));

    if args.json {
        let subtasks: Vec<_> = subtasks
            .iter()
            .map(|(id, request)| {
                json!({
                    "id": id,
                    "name": request.name,
                    "args": serde_json::from_str::<serde_json::Value>(&request.args).ok(),
                    "queue": request.queue,
                    "priority": request.priority,
                    "countdown_ms": request.countdown.map(|d| d.as_millis() as u64),
                })
            })
            .collect();
        let canvases: Vec<_> = canvases
            .iter()
            .map(|(id, spec)| {
                json!({
                    "id": id,
                    "spec": serde_json::from_str::<serde_json::Value>(spec).ok(),
                })
            })
            .collect();
        let mut report = json!({
            "task_id": invocation.id,
            "task": invocation.name,
            "duration_ms": elapsed.as_secs_f64() * 1e3,
            "subtasks": subtasks,
            "canvases": canvases,
        });
        match &outcome {
            Ok(result) => {
                report["state"] = json!("succeeded");
                report["result"] = serde_json::from_str(result)?;
            }
            Err(error) => {
                report["state"] = json!(final_state(error));
                report["error"] = json!(error.to_string());
            }
        }
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (id, request) in &subtasks {
            eprintln!(
                "sub-task {} enqueued as {id} with {} (not run: `task run` has no broker)",
                request.name, request.args
            );
        }
        for (id, spec) in &canvases {
            eprintln!("canvas submitted as {id}: {spec} (not run: `task run` has no broker)");
        }
        match &outcome {
            Ok(result) => {
                let value: serde_json::Value = serde_json::from_str(result)?;
                println!("{}", serde_json::to_string_pretty(&value)?);
                eprintln!("{} succeeded in {}", args.name, human_duration(elapsed));
            }
            Err(error) => eprintln!("error: {} {error}", args.name),
        }
    }
    Ok(if outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The state a task in a worker would end in after this one run.
fn final_state(error: &RunError) -> &'static str {
    match error {
        RunError::Retry { .. } => "retrying",
        RunError::Revoked => "revoked",
        _ => "failed",
    }
}
