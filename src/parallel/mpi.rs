//! [`Collective`] over MPI through rsmpi (feature `mpi`; needs an MPI library such as OpenMPI
//! and libclang at build time). Merges run as an MPI user operation on a contiguous datatype of
//! one record, so MPI never splits a record between two calls.

use mpi::collective::{CommunicatorCollectives, SystemOperation, UserOperation};
use mpi::datatype::{Equivalence, MutView, UserDatatype, View};
use mpi::topology::{Communicator, SimpleCommunicator};

use super::{check_width, Collective, Merge};
use crate::error::{Result, XentError};

/// MPI's world communicator (or any other).
///
/// ```no_run
/// use xent::parallel::{mpi::MpiCollective, Collective};
/// let comm = MpiCollective::init()?; // MPI_Init; MPI_Finalize when dropped
/// println!("rank {} of {}", comm.rank(), comm.size());
/// # Ok::<(), xent::XentError>(())
/// ```
pub struct MpiCollective {
    // Declared before `universe`: dropped (freed) before MPI is finalised.
    comm: SimpleCommunicator,
    universe: Option<mpi::environment::Universe>,
}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCollective").field("rank", &self.rank()).field("size", &self.size()).finish()
    }
}

impl MpiCollective {
    /// Over `comm` (e.g. `universe.world()` of an initialised `mpi::Universe`).
    pub fn new(comm: SimpleCommunicator) -> Self {
        MpiCollective { comm, universe: None }
    }

    /// Initialises MPI and takes its world communicator; MPI is finalised when this is
    /// dropped. Outside `mpirun` this is a world of one process.
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize()
            .ok_or_else(|| XentError::InvalidOption("MPI is already initialised in this process".into()))?;
        Ok(MpiCollective { comm: universe.world(), universe: Some(universe) })
    }

    /// Whether this value owns MPI's initialisation (made by [`Self::init`]).
    pub fn owns_mpi(&self) -> bool {
        self.universe.is_some()
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }
    fn size(&self) -> usize {
        self.comm.size() as usize
    }
    fn all_reduce_sum(&self, data: &mut [f64]) -> Result<()> {
        let send = data.to_vec();
        self.comm.all_reduce_into(&send[..], data, SystemOperation::sum());
        Ok(())
    }
    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()> {
        let send = data.to_vec();
        self.comm.all_reduce_into(&send[..], data, SystemOperation::sum());
        Ok(())
    }
    fn all_reduce_max(&self, data: &mut [f64]) -> Result<()> {
        let send = data.to_vec();
        self.comm.all_reduce_into(&send[..], data, SystemOperation::max());
        Ok(())
    }
    fn all_reduce_with(&self, data: &mut [f64], width: usize, merge: Merge) -> Result<()> {
        check_width(data, width)?;
        let records = data.len() / width;
        if records == 0 {
            return Ok(());
        }
        let record = UserDatatype::contiguous(width as i32, &f64::equivalent_datatype());
        let op = UserOperation::commutative(move |x, mut acc| {
            // Each element of these buffers is one record of `width` f64.
            let n = x.len() * width;
            // SAFETY: MPI hands buffers of `len()` records of the committed contiguous type.
            let (x, acc) = unsafe {
                (
                    std::slice::from_raw_parts(x.as_ptr() as *const f64, n),
                    std::slice::from_raw_parts_mut(acc.as_mut_ptr() as *mut f64, n),
                )
            };
            for (xr, ar) in x.chunks(width).zip(acc.chunks_mut(width)) {
                merge(xr, ar);
            }
        });
        let send = data.to_vec();
        // SAFETY: both views cover `records` records of `width` f64 in their buffers.
        unsafe {
            let s = View::with_count_and_datatype(&send[..], records as i32, &record);
            let mut r = MutView::with_count_and_datatype(data, records as i32, &record);
            self.comm.all_reduce_into(&s, &mut r, &op);
        }
        Ok(())
    }
}
