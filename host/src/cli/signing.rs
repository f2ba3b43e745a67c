//! `stem-host signing keygen`: fresh keys for signed envelopes, as the variables that hold them.

use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};

use crate::signing::{Algorithm, generate};

#[derive(Subcommand)]
pub enum SigningCommand {
    /// Print a new key as the lines to export: for HMAC the shared secret (producers and
    /// workers), for Ed25519 the private key (producers) and the public key (workers).
    Keygen {
        #[arg(long, value_enum, default_value = "hmac-sha256")]
        algorithm: AlgorithmArg,
        /// The key's id, which signatures name (rotate by adding a key with a new id).
        #[arg(long, default_value = "k1")]
        id: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum AlgorithmArg {
    #[value(name = "hmac-sha256")]
    HmacSha256,
    Ed25519,
}

pub fn run(command: SigningCommand) -> anyhow::Result<ExitCode> {
    let SigningCommand::Keygen { algorithm, id } = command;
    if id.is_empty() || id.contains([':', ',']) || id.contains(char::is_whitespace) {
        anyhow::bail!("invalid key id `{id}`: no `:`, `,` or spaces");
    }
    match algorithm {
        AlgorithmArg::HmacSha256 => {
            let (secret, _) = generate(Algorithm::HmacSha256);
            println!("export STEM_SIGNING_ALGORITHM=hmac-sha256");
            println!("export STEM_SIGNING_KEYS={id}:{secret}");
            println!("export STEM_SIGNING_ACTIVE_KEY={id}");
        }
        AlgorithmArg::Ed25519 => {
            let (seed, public) = generate(Algorithm::Ed25519);
            let public = public.expect("an Ed25519 key has a public half");
            println!("export STEM_SIGNING_ALGORITHM=ed25519");
            println!("# producers (and Beat): the private key");
            println!("export STEM_SIGNING_PRIVATE_KEYS={id}:{seed}");
            println!("export STEM_SIGNING_ACTIVE_KEY={id}");
            println!("# workers: the public key only");
            println!("export STEM_SIGNING_PUBLIC_KEYS={id}:{public}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
