//! What the launcher's environment says about the job, read before MPI starts. Each MPI launcher
//! tells its processes the job's size in its own variable; a binary built against one MPI but
//! started by another's launcher initialises as a lone process, and would silently train N
//! independent copies of the model. Comparing the two sizes catches that.

/// Variables in which launchers publish the number of processes: Open MPI's `mpirun`, the PMI
/// of MPICH/Intel MPI/Slurm, PMIx, MVAPICH.
pub const SIZE_VARS: [&str; 4] = [
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_SIZE",
    "MV2_COMM_WORLD_SIZE",
];

/// The job size a launcher announced: the first of [`SIZE_VARS`] that is set and parses, with
/// its name. `get` reads one variable (the process environment, or a map in tests).
pub fn launcher_size(get: impl Fn(&str) -> Option<String>) -> Option<(&'static str, usize)> {
    SIZE_VARS
        .iter()
        .find_map(|&var| Some((var, get(var)?.trim().parse().ok()?)))
}

/// Why this process cannot take part in the job, or None when it can: `mpi_world` is the size
/// MPI reports (None: the binary was built without MPI).
pub fn mismatch(launcher: Option<(&str, usize)>, mpi_world: Option<usize>) -> Option<String> {
    let (var, size) = launcher?;
    match mpi_world {
        None if size > 1 => Some(format!(
            "the launcher started {size} processes ({var}={size}), but this binary was built without MPI, so each would train alone; rebuild with `cargo build --release --features mpi`"
        )),
        Some(world) if world != size => Some(format!(
            "the launcher started {size} processes ({var}={size}), but MPI reports a world of {world}: the binary was built against a different MPI than the launcher's (start it with the mpirun of the MPI it was built with, e.g. Open MPI's)"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn reads_the_first_launcher_variable_that_parses() {
        assert_eq!(launcher_size(env(&[])), None);
        assert_eq!(
            launcher_size(env(&[("PMI_SIZE", "4"), ("PMIX_SIZE", "2")])),
            Some(("PMI_SIZE", 4))
        );
        assert_eq!(
            launcher_size(env(&[("OMPI_COMM_WORLD_SIZE", "x"), ("PMI_SIZE", "3")])),
            Some(("PMI_SIZE", 3))
        );
    }

    #[test]
    fn a_launched_job_without_mpi_or_with_another_mpi_is_refused() {
        let no_mpi = mismatch(Some(("OMPI_COMM_WORLD_SIZE", 2)), None).unwrap();
        assert!(no_mpi.contains("--features mpi"), "{no_mpi}");
        let other = mismatch(Some(("PMI_SIZE", 4)), Some(1)).unwrap();
        assert!(
            other.contains("PMI_SIZE=4") && other.contains("world of 1"),
            "{other}"
        );
        assert_eq!(mismatch(Some(("PMI_SIZE", 1)), None), None);
        assert_eq!(mismatch(Some(("OMPI_COMM_WORLD_SIZE", 2)), Some(2)), None);
        assert_eq!(mismatch(None, None), None);
    }
}
