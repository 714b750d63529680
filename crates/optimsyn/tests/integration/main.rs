//! `optimsyn` program tests: one binary, so libtorch is linked once. Each test runs the built
//! program as a user would.

mod diagnostics_cli;
mod hygiene_cli;
mod lm_cli;
mod resume_cli;
mod served_cli;
mod train_cli;
