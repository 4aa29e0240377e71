//! The operator CLI, `reuseportctl`: one module per subcommand.
