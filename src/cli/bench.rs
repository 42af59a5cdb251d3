//! `xent bench`: placeholder until the benchmark lands.
use clap::Args;
use crate::error::Result;

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {}

pub(crate) fn run(_a: &BenchArgs) -> Result<()> {
    Ok(())
}
