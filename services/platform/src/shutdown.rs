//! Shutdown coordination. A [`Shutdown`] is triggered once (by a signal, or by the launcher
//! or a test); servers watch it to start their drain sequence.

use tokio_util::sync::CancellationToken;

#[derive(Clone, Default, Debug)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    pub async fn wait(&self) {
        self.token.cancelled().await
    }

    /// A shutdown triggered by the first SIGTERM or SIGINT; a second one exits at once
    /// with status 128 + signal number, for operators who do not want to wait.
    pub fn on_signals() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let shutdown = Self::new();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            let mut first = true;
            loop {
                let (name, number) = tokio::select! {
                    _ = term.recv() => ("SIGTERM", 15),
                    _ = int.recv() => ("SIGINT", 2),
                };
                if first {
                    tracing::info!(signal = name, "signal received, shutting down gracefully");
                    trigger.trigger();
                    first = false;
                } else {
                    tracing::warn!(signal = name, "second signal received, exiting immediately");
                    eprintln!("{name} received again: exiting without draining");
                    std::process::exit(128 + number);
                }
            }
        });
        Ok(shutdown)
    }
}
