//! The subcommands besides `run`: reading what is programmed (`list`,
//! `status`), preparing a node (`prepare-node`).
//!
//! Owns: presenting state to an operator. Must not: change what an agent
//! programmed (`cleanup` removes pins, see [`crate::datapath::loader`]).

pub mod list;
pub mod prepare_node;
