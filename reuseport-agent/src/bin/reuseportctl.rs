//! `reuseportctl`: the operator CLI of reuseport (see `reuseport_agent::ctl`).

fn main() -> std::process::ExitCode {
    reuseport_agent::ctl::main()
}
