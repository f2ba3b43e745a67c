//! `stem-host signing keygen`: fresh keys for signed envelopes, as the variables that hold them.

use std::process::ExitCode;

use clap::Subcommand;

use crate::signing::{Algorithm, generate};

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
    },
}

pub fn run(command: SigningCommand) -> anyhow::Result<ExitCode> {
    let SigningCommand::Keygen { algorithm, id } = command;
    if id.is_empty() || id.contains([':', ',']) || id.contains(char::is_whitespace) {
        anyhow::bail!("invalid key id `{id}`: no `:`, `,` or spaces");
    }
    let (secret, public) = generate(algorithm);
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
