//! `xent bench`: placeholder until the benchmark lands.
use crate::error::Result;
use clap::Args;

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {}

pub(crate) fn run(_a: &BenchArgs) -> Result<()> {
    Ok(())
}
