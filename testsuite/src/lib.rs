//! morph86-testsuite: conformance runners, differential fuzzing, guest boot tests and
//! benchmarks. Each runner is a binary in `src/bin/`; shared machinery lives here.
#![deny(missing_docs)]

pub mod hostdiff;
pub mod singlestep;
