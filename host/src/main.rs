fn main() -> std::process::ExitCode {
    stem_host::cli::main()
}
