//! The domain: what a job is (its spec, parameters, state and counters),
//! how a table is named and opened, how its fragments become tasks, what a
//! user function's declaration binds, who may do what, the errors the
//! service tells apart, and what a job will cost before it runs. Depends
//! on nothing else of the crate.

pub mod binding;
pub mod error;
pub mod estimate;
pub mod job;
pub mod plan;
pub mod policy;
pub mod principal;
pub mod table;
