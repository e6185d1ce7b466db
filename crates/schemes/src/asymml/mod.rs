//! `asymml`: the AsymML / 3LegRace asymmetric decomposition (being written).

pub mod lowrank;
