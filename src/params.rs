//! The flat parameter and state buffers of a plan.
