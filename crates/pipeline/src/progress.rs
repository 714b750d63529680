//! How a long stage tells its caller how far it is: the binary draws a progress bar, a library
//! user may log, or ignore it ([`Quiet`]).

/// Progress of one long stage (stage 2's GRPO steps).
pub trait Progress {
    /// The stage `what` begins: `total` units, `done` of them finished already (a resumed run).
    fn start(&mut self, what: &str, total: u64, done: u64) {
        let _ = (what, total, done);
    }
    /// `done` units are finished; `message` is a short status (e.g. the mean reward).
    fn advance(&mut self, done: u64, message: &str) {
        let _ = (done, message);
    }
    /// The stage is over.
    fn finish(&mut self) {}
}

/// Reports nothing (stages still log with `tracing`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;

impl Progress for Quiet {}
