//! Reading a value of a closed set back from the one name it is written as
//! (a reject reason, a device status, an alert's aggregate): the `FromStr`
//! of every such enum, with one error that lists the choices.

/// The one of `all` that `name` calls `s`; else an error naming `what` was
/// asked for and every choice.
pub fn by_name<T: Copy>(
    all: &[T],
    name: fn(T) -> &'static str,
    what: &str,
    s: &str,
) -> Result<T, String> {
    all.iter().copied().find(|t| name(*t) == s).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|t| name(*t)).collect();
        format!("unknown {what} `{s}`; use one of {}", names.join(", "))
    })
}

/// `Display` and `FromStr` for an enum of a closed set that has `ALL` and
/// `as_str`: written as its one name and read back with [`by_name`], `what`
/// naming the set in the error (`named!(Status, "status")`).
#[macro_export]
macro_rules! named {
    ($t:ty, $what:literal) => {
        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $t {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $crate::name::by_name(&Self::ALL, Self::as_str, $what, s)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::by_name;
    use crate::RejectReason;

    #[test]
    fn every_name_reads_back_and_an_unknown_one_lists_the_choices() {
        for r in RejectReason::ALL {
            assert_eq!(
                by_name(&RejectReason::ALL, RejectReason::as_str, "x", r.as_str()),
                Ok(r)
            );
        }
        let e = by_name(
            &[true, false],
            |b| if b { "yes" } else { "no" },
            "answer",
            "maybe",
        );
        assert_eq!(
            e,
            Err("unknown answer `maybe`; use one of yes, no".to_string())
        );
    }
}
