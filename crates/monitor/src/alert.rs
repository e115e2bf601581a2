//! The QPS alert rule's state machine, one per host, after Prometheus alerting rules
//! (`docs/prometheus/latest/configuration/alerting_rules`): the condition turns an inactive
//! alert *pending*; held for `for_seconds` it becomes *firing*; a pending alert whose
//! condition goes away returns to inactive. Unlike Prometheus, a firing alert resolves only
//! once the value is at or below a separate clear threshold (hysteresis against flapping),
//! and then becomes inactive again.
//!
//! Pure: every call gets the time (`now`, seconds) from the caller, so tests need no sleeps.

use serde::Serialize;
use topology::AlertRule;

/// The state of one host's alert.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The condition does not hold.
    Inactive,
    /// The condition holds, not yet for `for_seconds`.
    Pending,
    /// The condition held for `for_seconds`; not yet cleared.
    Firing,
}

/// A transition worth notifying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// The alert started firing.
    Firing,
    /// A firing alert cleared.
    Resolved,
}

/// One host's alert: state, when it was entered, the last value seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    state: State,
    since: f64,
    value: Option<f64>,
    /// Firing: since when the value has been at or below the clear threshold.
    clearing_since: Option<f64>,
}

impl Alert {
    /// A new, inactive alert at time `now`.
    pub fn new(now: f64) -> Alert {
        Alert {
            state: State::Inactive,
            since: now,
            value: None,
            clearing_since: None,
        }
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// When the current state was entered (seconds, the caller's clock).
    pub fn since(&self) -> f64 {
        self.since
    }

    /// The last value observed (requests per second), `None` when there was no data.
    pub fn value(&self) -> Option<f64> {
        self.value
    }

    /// Feeds one evaluation: `value` is the host's QPS at `now`, `None` without data.
    ///
    /// Without data a pending alert returns to inactive and a firing one keeps firing (it
    /// cannot be shown to have cleared; staleness is reported beside it). Returns the
    /// event to notify, if any.
    pub fn observe(&mut self, rule: &AlertRule, now: f64, value: Option<f64>) -> Option<Event> {
        self.value = value;
        let above = value.is_some_and(|v| v > rule.threshold_rps);
        let held = now - self.since >= rule.for_seconds as f64;
        match self.state {
            State::Inactive if above => {
                self.enter(State::Pending, now);
                if rule.for_seconds == 0 {
                    self.enter(State::Firing, now);
                    return Some(Event::Firing);
                }
                None
            }
            State::Pending if !above => {
                self.enter(State::Inactive, now);
                None
            }
            State::Pending if held => {
                self.enter(State::Firing, now);
                Some(Event::Firing)
            }
            State::Firing if value.is_some_and(|v| v <= rule.clear_rps) => {
                let clearing = *self.clearing_since.get_or_insert(now);
                if now - clearing >= rule.clear_for_seconds as f64 {
                    self.enter(State::Inactive, now);
                    Some(Event::Resolved)
                } else {
                    None
                }
            }
            State::Firing => {
                // Above the clear threshold again, or no data: the clear period restarts.
                self.clearing_since = None;
                None
            }
            _ => None,
        }
    }

    fn enter(&mut self, state: State, now: f64) {
        self.state = state;
        self.since = now;
        self.clearing_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> AlertRule {
        AlertRule {
            clear_for_seconds: 0,
            threshold_rps: 100.0,
            for_seconds: 10,
            clear_rps: 80.0,
            window_seconds: 10,
        }
    }

    #[test]
    fn inactive_pending_firing_resolved_with_hysteresis() {
        let r = rule();
        let mut a = Alert::new(0.0);
        assert_eq!(a.observe(&r, 1.0, Some(50.0)), None);
        assert_eq!(a.state(), State::Inactive);
        // above the threshold: pending from t=2
        assert_eq!(a.observe(&r, 2.0, Some(150.0)), None);
        assert_eq!((a.state(), a.since()), (State::Pending, 2.0));
        // still pending before `for` has elapsed
        assert_eq!(a.observe(&r, 11.9, Some(150.0)), None);
        assert_eq!(a.state(), State::Pending);
        // held for 10 s: firing
        assert_eq!(a.observe(&r, 12.0, Some(150.0)), Some(Event::Firing));
        assert_eq!((a.state(), a.since()), (State::Firing, 12.0));
        // between clear and threshold: keeps firing (hysteresis)
        assert_eq!(a.observe(&r, 13.0, Some(90.0)), None);
        assert_eq!(a.state(), State::Firing);
        // no data: keeps firing
        assert_eq!(a.observe(&r, 14.0, None), None);
        assert_eq!(a.state(), State::Firing);
        // at the clear threshold: resolved, back to inactive
        assert_eq!(a.observe(&r, 15.0, Some(80.0)), Some(Event::Resolved));
        assert_eq!((a.state(), a.since()), (State::Inactive, 15.0));
        assert_eq!(a.value(), Some(80.0));
    }

    #[test]
    fn pending_that_drops_returns_to_inactive_and_restarts_for() {
        let r = rule();
        let mut a = Alert::new(0.0);
        a.observe(&r, 1.0, Some(101.0));
        // a dip to the hysteresis band while pending cancels it (only firing is sticky)
        assert_eq!(a.observe(&r, 5.0, Some(90.0)), None);
        assert_eq!(a.state(), State::Inactive);
        a.observe(&r, 6.0, Some(101.0));
        assert_eq!(a.observe(&r, 15.0, Some(101.0)), None);
        assert_eq!(a.state(), State::Pending);
        assert_eq!(a.observe(&r, 16.0, Some(101.0)), Some(Event::Firing));
        // missing data cancels pending
        let mut b = Alert::new(0.0);
        b.observe(&r, 1.0, Some(200.0));
        b.observe(&r, 2.0, None);
        assert_eq!(b.state(), State::Inactive);
    }

    #[test]
    fn a_firing_alert_resolves_only_after_clear_for_seconds_below_the_clear_threshold() {
        let r = AlertRule {
            clear_for_seconds: 5,
            for_seconds: 0,
            ..rule()
        };
        let mut a = Alert::new(0.0);
        assert_eq!(a.observe(&r, 1.0, Some(150.0)), Some(Event::Firing));
        // a 3 s dip below the clear threshold does not resolve it (no flap)
        for t in 2..=4 {
            assert_eq!(a.observe(&r, f64::from(t), Some(10.0)), None);
        }
        assert_eq!(a.observe(&r, 5.0, Some(150.0)), None);
        assert_eq!(a.state(), State::Firing);
        // 5 s at or below it: resolved
        for t in 6..=10 {
            assert_eq!(a.observe(&r, f64::from(t), Some(10.0)), None, "t={t}");
        }
        assert_eq!(a.observe(&r, 11.0, Some(10.0)), Some(Event::Resolved));
        assert_eq!(a.state(), State::Inactive);
    }

    #[test]
    fn zero_for_fires_at_once_and_threshold_is_strict() {
        let r = AlertRule {
            clear_for_seconds: 0,
            for_seconds: 0,
            ..rule()
        };
        let mut a = Alert::new(0.0);
        assert_eq!(a.observe(&r, 1.0, Some(100.0)), None);
        assert_eq!(a.observe(&r, 2.0, Some(100.5)), Some(Event::Firing));
        assert_eq!(a.state(), State::Firing);
    }
}
