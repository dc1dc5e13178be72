//! Which rate to try next: raise the rate by a factor until a step fails,
//! then bisect (geometrically) between the last pass and the first failure.
//! A pure planner, so that its sequence of rates is tested without running
//! anything.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RampPlan {
    pub start: f64,
    /// The factor between steps while climbing.
    pub factor: f64,
    /// No step above this rate is tried.
    pub max: f64,
    /// Bisection steps after the first failure.
    pub refine: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ramp {
    plan: RampPlan,
    phase: Phase,
    /// The highest rate that passed.
    best: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Climbing {
        rate: f64,
    },
    /// Between the last pass and the first failure, `left` steps to go.
    Refining {
        pass: f64,
        fail: f64,
        left: u32,
    },
    Done,
}

impl Ramp {
    pub fn new(plan: RampPlan) -> Ramp {
        let phase = if plan.start > 0.0 && plan.start <= plan.max && plan.factor > 1.0 {
            Phase::Climbing { rate: plan.start }
        } else {
            Phase::Done
        };
        Ramp {
            plan,
            phase,
            best: None,
        }
    }

    /// The rate of the next step, or `None` when the ramp is over.
    pub fn next_rate(&self) -> Option<f64> {
        match self.phase {
            Phase::Climbing { rate } => Some(rate),
            Phase::Refining { pass, fail, .. } => Some((pass * fail).sqrt()),
            Phase::Done => None,
        }
    }

    /// Records whether the step at [`Ramp::next_rate`] passed.
    pub fn record(&mut self, passed: bool) {
        let Some(rate) = self.next_rate() else {
            return;
        };
        if passed {
            self.best = Some(rate);
        }
        self.phase = match self.phase {
            Phase::Climbing { .. } if passed => {
                let next = rate * self.plan.factor;
                if next <= self.plan.max {
                    Phase::Climbing { rate: next }
                } else {
                    // Every step up to the ceiling passed: nothing to narrow.
                    Phase::Done
                }
            }
            Phase::Climbing { .. } => match self.best {
                Some(pass) if self.plan.refine > 0 => Phase::Refining {
                    pass,
                    fail: rate,
                    left: self.plan.refine,
                },
                _ => Phase::Done,
            },
            Phase::Refining { pass, fail, left } => {
                let (pass, fail) = if passed { (rate, fail) } else { (pass, rate) };
                if left > 1 {
                    Phase::Refining {
                        pass,
                        fail,
                        left: left - 1,
                    }
                } else {
                    Phase::Done
                }
            }
            Phase::Done => Phase::Done,
        };
    }

    /// The highest rate that passed so far: the sustained rate once done.
    pub fn best(&self) -> Option<f64> {
        self.best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a ramp against a pipeline that passes every rate below `limit`.
    fn run(plan: RampPlan, limit: f64) -> (Vec<f64>, Option<f64>) {
        let mut ramp = Ramp::new(plan);
        let mut tried = vec![];
        while let Some(rate) = ramp.next_rate() {
            tried.push(rate.round());
            ramp.record(rate < limit);
        }
        (tried, ramp.best().map(f64::round))
    }

    const PLAN: RampPlan = RampPlan {
        start: 10_000.0,
        factor: 1.5,
        max: 2_000_000.0,
        refine: 2,
    };

    #[test]
    fn it_climbs_to_the_first_failure_then_bisects_between_pass_and_failure() {
        let (tried, best) = run(PLAN, 100_000.0);
        let climb = [
            10_000.0, 15_000.0, 22_500.0, 33_750.0, 50_625.0, 75_938.0, 113_906.0,
        ];
        assert_eq!(tried[..7], climb);
        // sqrt(75,938 × 113,906) passes; sqrt(93,004 × 113,906) fails.
        assert_eq!(tried[7..], [93_004.0, 102_926.0]);
        assert_eq!(best, Some(93_004.0));
    }

    #[test]
    fn a_first_step_that_fails_has_nothing_to_refine() {
        assert_eq!(run(PLAN, 1.0), (vec![10_000.0], None));
    }

    #[test]
    fn it_stops_at_the_ceiling_when_every_step_passes() {
        let plan = RampPlan {
            max: 30_000.0,
            ..PLAN
        };
        assert_eq!(
            run(plan, f64::INFINITY),
            (vec![10_000.0, 15_000.0, 22_500.0], Some(22_500.0))
        );
    }

    #[test]
    fn no_refinement_asked_means_none_is_run() {
        let plan = RampPlan { refine: 0, ..PLAN };
        let (tried, best) = run(plan, 20_000.0);
        assert_eq!(tried, [10_000.0, 15_000.0, 22_500.0]);
        assert_eq!(best, Some(15_000.0));
    }

    #[test]
    fn a_plan_that_cannot_climb_runs_nothing() {
        for plan in [
            RampPlan {
                factor: 1.0,
                ..PLAN
            },
            RampPlan { start: 0.0, ..PLAN },
            RampPlan { max: 1.0, ..PLAN },
        ] {
            assert_eq!(run(plan, f64::INFINITY), (vec![], None), "{plan:?}");
        }
    }
}
