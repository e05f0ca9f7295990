//! Flags of the dashboard (`crate::ui`), served on the HTTP listener.

use std::time::Duration;

#[derive(Clone, Debug, clap::Args)]
pub struct UiArgs {
    /// How long a dashboard session lasts without a request; a session
    /// also ends with its token (expiry or revocation).
    #[arg(long, env = "ISDP_UI_SESSION_IDLE", default_value = "30m", value_parser = humantime::parse_duration)]
    pub ui_session_idle: Duration,

    /// Most dashboard sessions held at once; a login over it ends the
    /// session idle longest, so logins cannot grow memory.
    #[arg(long, env = "ISDP_UI_MAX_SESSIONS", default_value_t = 1024)]
    pub ui_max_sessions: usize,

    /// Most live-update streams (Server-Sent Events) open at once across
    /// all sessions; one over it is answered 503. Each also holds one of
    /// the listener's `--http-max-connections`.
    #[arg(long, env = "ISDP_UI_MAX_STREAMS", default_value_t = 64)]
    pub ui_max_streams: usize,

    /// Most live-update streams one session may hold at once (browser tabs).
    #[arg(long, env = "ISDP_UI_MAX_STREAMS_PER_SESSION", default_value_t = 8)]
    pub ui_max_streams_per_session: usize,
}

impl UiArgs {
    pub fn validate(&self) -> Result<(), String> {
        for (flag, zero) in [
            ("--ui-session-idle", self.ui_session_idle.is_zero()),
            ("--ui-max-sessions", self.ui_max_sessions == 0),
            ("--ui-max-streams", self.ui_max_streams == 0),
            (
                "--ui-max-streams-per-session",
                self.ui_max_streams_per_session == 0,
            ),
        ] {
            if zero {
                return Err(format!("{flag} must be more than zero"));
            }
        }
        Ok(())
    }
}
