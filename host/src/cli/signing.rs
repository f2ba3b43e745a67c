//! `stem-host signing keygen`: fresh keys for signed envelopes, as the variables that hold them.

use std::process::ExitCode;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;

use crate::signing::{Algorithm, PRIVATE_KEY_MARK, PUBLIC_KEY_MARK, generate};

#[derive(Subcommand)]
pub enum SigningCommand {
    /// Print a new key as the lines to export: for HMAC the shared secret (producers and
    /// workers), for Ed25519 the private key (producers) and the public key (workers).
    Keygen {
        #[arg(long, value_enum, default_value = "hmac-sha256")]
        algorithm: Algorithm,
        /// The key's id, which signatures name (rotate by adding a key with a new id).
        #[arg(long, default_value = "k1")]
        id: String,
        /// Also write the Ed25519 key pair as files for signed components: DIR/ID.key (the
        /// private key, for `task upload --sign`, mode 0600) and DIR/ID.pub (for a worker's
        /// `--trusted-keys`).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

pub fn run(command: SigningCommand) -> anyhow::Result<ExitCode> {
    let SigningCommand::Keygen { algorithm, id, out } = command;
    if id.is_empty() || id.contains([':', ',', '/', '#']) || id.contains(char::is_whitespace) {
        anyhow::bail!("invalid key id `{id}`: no `:`, `,`, `/`, `#` or spaces");
    }
    let (secret, public) = generate(algorithm);
    if let Some(dir) = out {
        let Some(public) = &public else {
            anyhow::bail!("--out writes Ed25519 key files: add --algorithm ed25519");
        };
        write_key_files(&dir, &id, &secret, public)?;
        return Ok(ExitCode::SUCCESS);
    }
    match public {
        None => {
            println!("export STEM_SIGNING_ALGORITHM=hmac-sha256");
            println!("export STEM_SIGNING_KEYS={id}:{secret}");
            println!("export STEM_SIGNING_ACTIVE_KEY={id}");
        }
        Some(public) => {
            println!("export STEM_SIGNING_ALGORITHM=ed25519");
            println!("# producers (and Beat): the private key");
            println!("export STEM_SIGNING_PRIVATE_KEYS={id}:{secret}");
            println!("export STEM_SIGNING_ACTIVE_KEY={id}");
            println!("# workers: the public key only");
            println!("export STEM_SIGNING_PUBLIC_KEYS={id}:{public}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_key_files(dir: &Path, id: &str, secret: &str, public: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let private_path = dir.join(format!("{id}.key"));
    let mut private = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private_path)
        .with_context(|| {
            format!(
                "cannot create {} (it must not exist yet)",
                private_path.display()
            )
        })?;
    writeln!(private, "# {PRIVATE_KEY_MARK}: keep it secret")?;
    writeln!(private, "{id}:{secret}")?;
    let public_path = dir.join(format!("{id}.pub"));
    std::fs::write(
        &public_path,
        format!("# {PUBLIC_KEY_MARK}\n{id}:{public}\n"),
    )
    .with_context(|| format!("cannot write {}", public_path.display()))?;
    println!(
        "private key: {} (for `task upload --sign`)",
        private_path.display()
    );
    println!(
        "public key:  {} (for `worker start --trusted-keys`)",
        public_path.display()
    );
    Ok(())
}
