//! The board's energy counter: NVML's total energy since the driver loaded, read around `llamatune
//! bench`'s timed steps (`Backend::energy_joules`). Why: a step that draws the card to its power limit
//! is throttled, so its time follows its joules (docs/PERF.md, session 31: our 7B steps average ~700 W,
//! the H200's limit); the joules per step say what a change saves where time alone cannot. NVML is
//! opened at run time (libnvidia-ml.so.1 comes with the driver); without it, or on a board without the
//! counter, there is no reading. On the H200 the counter moves about every 100 ms, so a reading over a
//! few steps is good to about one update (~70 J at 700 W).

use cudarc::driver::sys;
use std::ffi::{c_char, c_int, c_ulonglong, c_void};

type Device = *mut c_void;

/// NVML's library, kept open, and the device's handle.
pub(super) struct Nvml {
    _lib: libloading::Library,
    total_energy: unsafe extern "C" fn(Device, *mut c_ulonglong) -> c_int,
    device: Device,
}

// SAFETY: NVML's calls are thread-safe and a device handle is a process-wide value.
unsafe impl Send for Nvml {}
// SAFETY: as above; nothing here is mutated after `open`.
unsafe impl Sync for Nvml {}

impl Nvml {
    /// NVML's handle of CUDA device `dev`, found by its PCI bus id (NVML numbers devices in PCI order,
    /// CUDA in its own and after CUDA_VISIBLE_DEVICES); `None` where NVML, the device or its energy
    /// counter is missing.
    pub(super) fn open(dev: sys::CUdevice) -> Option<Self> {
        let mut bus = [0 as c_char; 32];
        // SAFETY: the buffer holds `len` bytes; the driver writes a NUL-terminated id into it.
        unsafe { sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as c_int, dev) }.result().ok()?;
        // SAFETY: loading the driver's NVML runs its (trusted) initializers; each symbol is taken with
        // the signature NVML's header gives it, and the library outlives them (kept in `_lib`).
        unsafe {
            let lib = libloading::Library::new("libnvidia-ml.so.1").ok()?;
            let init: libloading::Symbol<unsafe extern "C" fn() -> c_int> = lib.get(b"nvmlInit_v2").ok()?;
            let by_bus: libloading::Symbol<unsafe extern "C" fn(*const c_char, *mut Device) -> c_int> =
                lib.get(b"nvmlDeviceGetHandleByPciBusId_v2").ok()?;
            let total_energy = *lib.get(b"nvmlDeviceGetTotalEnergyConsumption").ok()?;
            let mut device: Device = std::ptr::null_mut();
            if init() != 0 || by_bus(bus.as_ptr(), &mut device) != 0 {
                return None;
            }
            let nvml = Nvml { total_energy, device, _lib: lib };
            nvml.energy_mj().map(|_| nvml)
        }
    }

    /// Millijoules since the driver loaded.
    pub(super) fn energy_mj(&self) -> Option<u64> {
        let mut mj: c_ulonglong = 0;
        // SAFETY: a live handle from `open` and a valid out-pointer.
        (unsafe { (self.total_energy)(self.device, &mut mj) } == 0).then_some(mj)
    }
}
