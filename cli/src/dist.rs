//! The process group a command runs in: with the `mpi` feature and under `mpirun` (or another
//! MPI launcher), MPI's world; otherwise one process. `eval` and `perplexity` split their rows
//! across the group; other commands refuse to run in a group of more than one.

use xent::parallel::{Collective, SingleProcess};
use xent::{Result, XentError};

/// Whether an MPI launcher started this process (OpenMPI, MPICH/Hydra and PMIx set these).
#[cfg(feature = "mpi")]
fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"].iter().any(|k| std::env::var_os(k).is_some())
}

/// The group: MPI's world when launched by MPI (initialised here, finalised when dropped).
pub fn world() -> Result<Box<dyn Collective>> {
    #[cfg(feature = "mpi")]
    if launched_by_mpi() {
        return Ok(Box::new(xent::parallel::mpi::MpiCollective::init()?));
    }
    Ok(Box::new(SingleProcess))
}

/// For commands that run in one process only.
pub fn single(comm: &dyn Collective, what: &str) -> Result<()> {
    if comm.size() > 1 {
        return Err(XentError::InvalidOption(format!(
            "{what} runs in one process; under mpirun only `eval` and `perplexity` split their rows across ranks"
        )));
    }
    Ok(())
}
