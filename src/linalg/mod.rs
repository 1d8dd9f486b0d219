//! Backend-independent numerical building blocks.

pub mod philox;
