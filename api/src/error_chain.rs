//! An error with every cause it wraps, on one line.
//!
//! Client errors name only their outermost layer (`client error (Connect)`); what an operator
//! needs is further down the chain (`tcp connect error: Connection refused`, an untrusted
//! certificate). Layers that merely repeat their cause's text are left out.

use std::error::Error;
use std::fmt;

/// Displays `error: cause: cause's cause…`, skipping causes whose text is already shown.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let text = error.to_string();
            if !text.is_empty() && !shown.contains(&text) {
                write!(f, ": {text}")?;
                shown.push_str(&text);
            }
            cause = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|l| l as &(dyn Error + 'static))
        }
    }

    #[test]
    fn shows_every_cause_once() {
        let error = Layer(
            "ServiceError: client error (Connect)",
            Some(Box::new(Layer(
                "client error (Connect)",
                Some(Box::new(Layer(
                    "tcp connect error",
                    Some(Box::new(Layer("Connection refused (os error 111)", None))),
                ))),
            ))),
        );
        assert_eq!(
            Chain(&error).to_string(),
            "ServiceError: client error (Connect): tcp connect error: Connection refused (os error 111)"
        );
        assert_eq!(Chain(&Layer("alone", None)).to_string(), "alone");
    }
}
