//! GPU discovery through NVML (`libnvidia-ml.so.1`) via `nvml-wrapper`.

use std::path::Path;

use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor, TemperatureThreshold};
use nvml_wrapper::enums::device::{DeviceArchitecture, SampleValue};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_REMAPPED_COR, NVML_FI_DEV_REMAPPED_FAILURE, NVML_FI_DEV_REMAPPED_PENDING,
    NVML_FI_DEV_REMAPPED_UNC,
};
use nvml_wrapper::{Device, Nvml};

use super::types::{
    ComputeCapability, Gpu, GpuError, GpuHealth, GpuInventory, GpuSource, MigDevice, MigMode, RemappedRows,
};
use crate::pci::{self, PciEntry};
use crate::sysfs::Warnings;

/// NVLink ports per GPU in the NVML API (`NVML_NVLINK_MAX_LINKS`); H100 SXM
/// uses all 18.
const NVLINK_MAX_LINKS: u32 = 18;

/// The soname NVML is loaded by when no path is given, for messages.
const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// Loads and initialises NVML. A failure to open the library or find its
/// symbols is a load error; anything `nvmlInit` itself returns is an init
/// error, so the message says which half is broken.
fn init(library: Option<&Path>) -> Result<Nvml, GpuError> {
    let result = match library {
        Some(path) => Nvml::builder().lib_path(path.as_os_str()).init(),
        None => Nvml::init(),
    };
    result.map_err(|e| {
        let library = library.map_or_else(|| DEFAULT_LIBRARY.to_owned(), |p| p.display().to_string());
        match e {
            NvmlError::LibloadingError(e) => GpuError::Load {
                library,
                reason: e.to_string(),
            },
            NvmlError::FailedToLoadSymbol(reason) => GpuError::Load { library, reason },
            e => GpuError::Init(e),
        }
    })
}

/// Shuts NVML down without risking a panic: `Nvml`'s `Drop` calls
/// `nvmlShutdown` through a binding that panics when the symbol is missing
/// (a broken or partial library), so in that case the handle is leaked
/// instead. This is a one-shot process; the leak is harmless.
fn shutdown(nvml: Nvml, warnings: &mut Warnings) {
    if nvml.lib().nvmlShutdown.is_err() {
        std::mem::forget(nvml);
        warnings.push("NVML library has no nvmlShutdown; left initialized");
        return;
    }
    if let Err(e) = nvml.shutdown() {
        warnings.push(format!("NVML shutdown failed: {e}"));
    }
}

/// Turns an optional NVML answer into `Option`: "not supported" is a normal
/// answer for many queries on many GPUs; other errors are warnings.
fn optional<T>(warnings: &mut Warnings, gpu: u32, what: &str, result: Result<T, NvmlError>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(NvmlError::NotSupported) => None,
        Err(e) => {
            warnings.push(format!("NVML GPU {gpu}: cannot read {what}: {e}"));
            None
        }
    }
}

/// The family from NVML's architecture, falling back to the compute
/// capability for architectures newer than this nvml-wrapper knows.
fn family(arch: Option<DeviceArchitecture>, cc: Option<ComputeCapability>) -> Option<String> {
    let named = match arch {
        Some(DeviceArchitecture::Volta) => Some("volta"),
        Some(DeviceArchitecture::Turing) => Some("turing"),
        Some(DeviceArchitecture::Ampere) => Some("ampere"),
        Some(DeviceArchitecture::Ada) => Some("ada-lovelace"),
        Some(DeviceArchitecture::Hopper) => Some("hopper"),
        Some(DeviceArchitecture::Blackwell) => Some("blackwell"),
        Some(DeviceArchitecture::Pascal) => Some("pascal"),
        Some(DeviceArchitecture::Maxwell) => Some("maxwell"),
        Some(DeviceArchitecture::Kepler) => Some("kepler"),
        Some(DeviceArchitecture::Unknown) | None => None,
    };
    named
        .or_else(|| cc.and_then(ComputeCapability::family))
        .map(str::to_owned)
}

/// The MIG profile name for a MIG device, computed the way NVIDIA's own
/// tooling (go-nvlib) names profiles: the memory share is rounded up to an
/// eighth of the GPU, then scaled by the GPU's memory in whole GiB. That is
/// why a 9984 MiB slice of an 80 GB H100 is `1g.10gb`, not `1g.9gb`.
pub(crate) fn mig_profile(
    gi_slices: u32,
    ci_slices: u32,
    memory_mib: u64,
    parent_bytes: Option<u64>,
) -> String {
    let mem_bytes = u128::from(memory_mib) * u128::from(MIB);
    let gb = match parent_bytes.filter(|b| *b > 0) {
        Some(total) => {
            let total = u128::from(total);
            let eighths = (mem_bytes * 8).div_ceil(total);
            let total_gb = total.div_ceil(u128::from(GIB));
            (eighths * total_gb + 4) / 8
        }
        None => mem_bytes.div_ceil(u128::from(GIB)),
    };
    if ci_slices > 0 && ci_slices < gi_slices {
        format!("{ci_slices}c.{gi_slices}g.{gb}gb")
    } else {
        format!("{gi_slices}g.{gb}gb")
    }
}

fn mig_devices(
    device: &Device<'_>,
    gpu: u32,
    parent_bytes: Option<u64>,
    warnings: &mut Warnings,
) -> Vec<MigDevice> {
    let Some(max) = optional(warnings, gpu, "MIG device count", device.mig_device_count()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for index in 0..max {
        let mig = match device.mig_device_by_index(index) {
            Ok(m) => m,
            // Slots without a MIG device answer NOT_FOUND.
            Err(NvmlError::NotFound) => continue,
            Err(e) => {
                warnings.push(format!("NVML GPU {gpu}: cannot open MIG device {index}: {e}"));
                continue;
            }
        };
        let what = format!("MIG device {index}");
        let uuid = optional(warnings, gpu, &format!("{what} UUID"), mig.uuid());
        let attributes = optional(warnings, gpu, &format!("{what} attributes"), mig.attributes());
        let (profile, memory_bytes, multiprocessors) = match attributes {
            Some(a) => (
                Some(mig_profile(
                    a.gpu_instance_slice_count,
                    a.compute_instance_slice_count,
                    a.memory_size_mb,
                    parent_bytes,
                )),
                a.memory_size_mb.checked_mul(MIB),
                Some(a.multiprocessor_count),
            ),
            None => (None, None, None),
        };
        out.push(MigDevice {
            index,
            uuid,
            profile,
            memory_bytes,
            multiprocessors,
        });
    }
    out
}

/// Counts active NVLinks. `None` when the GPU has no NVLink at all (PCIe
/// cards answer NOT_SUPPORTED for link 0).
fn nvlinks_active(device: &Device<'_>, gpu: u32, warnings: &mut Warnings) -> Option<u32> {
    let mut active = 0;
    for link in 0..NVLINK_MAX_LINKS {
        match device.link_wrapper_for(link).is_active() {
            Ok(true) => active += 1,
            Ok(false) => {}
            Err(NvmlError::NotSupported) if link == 0 => return None,
            // Past the GPU's last link, or a link that is not wired.
            Err(NvmlError::NotSupported | NvmlError::InvalidArg) => break,
            Err(e) => {
                warnings.push(format!("NVML GPU {gpu}: cannot read NVLink {link} state: {e}"));
                break;
            }
        }
    }
    Some(active)
}

/// The row remapping counters, read as field values: nvml-wrapper has no safe call for
/// `nvmlDeviceGetRemappedRows`, and these four fields carry the same numbers.
const REMAP_FIELDS: [u32; 4] = [
    NVML_FI_DEV_REMAPPED_COR,
    NVML_FI_DEV_REMAPPED_UNC,
    NVML_FI_DEV_REMAPPED_PENDING,
    NVML_FI_DEV_REMAPPED_FAILURE,
];

/// A field value as an unsigned integer; `None` for a negative or floating-point one.
fn field_integer(value: SampleValue) -> Option<u64> {
    match value {
        SampleValue::U32(v) => Some(u64::from(v)),
        SampleValue::U64(v) => Some(v),
        SampleValue::I64(v) => u64::try_from(v).ok(),
        SampleValue::F64(_) => None,
    }
}

/// Row remapping state; `None` unless all four fields were answered.
fn remapped_rows(device: &Device<'_>, gpu: u32, warnings: &mut Warnings) -> Option<RemappedRows> {
    let ids = REMAP_FIELDS.map(FieldId);
    let samples = optional(warnings, gpu, "remapped rows", device.field_values_for(&ids))?;
    let mut values = [0u64; REMAP_FIELDS.len()];
    for (slot, sample) in values.iter_mut().zip(samples) {
        let value = optional(warnings, gpu, "remapped rows", sample.and_then(|s| s.value))?;
        let Some(n) = field_integer(value) else {
            warnings.push(format!(
                "NVML GPU {gpu}: remapped rows field is not an unsigned integer"
            ));
            return None;
        };
        *slot = n;
    }
    let [correctable, uncorrectable, pending, failed] = values;
    Some(RemappedRows {
        correctable: u32::try_from(correctable).unwrap_or(u32::MAX),
        uncorrectable: u32::try_from(uncorrectable).unwrap_or(u32::MAX),
        pending: pending != 0,
        failed: failed != 0,
    })
}

/// Error counters, thermal and power state; each query that is not supported is `None`.
fn read_health(device: &Device<'_>, gpu: u32, warnings: &mut Warnings) -> GpuHealth {
    let uncorrected = |counter| device.total_ecc_errors(MemoryError::Uncorrected, counter);
    let threshold = |kind| device.temperature_threshold(kind);
    GpuHealth {
        ecc_enabled: optional(warnings, gpu, "ECC mode", device.is_ecc_enabled())
            .map(|m| m.currently_enabled),
        ecc_uncorrected_volatile: optional(
            warnings,
            gpu,
            "volatile uncorrected ECC errors",
            uncorrected(EccCounter::Volatile),
        ),
        ecc_uncorrected_aggregate: optional(
            warnings,
            gpu,
            "aggregate uncorrected ECC errors",
            uncorrected(EccCounter::Aggregate),
        ),
        retired_pages_pending: optional(
            warnings,
            gpu,
            "pending page retirement",
            device.are_pages_pending_retired(),
        ),
        remapped_rows: remapped_rows(device, gpu, warnings),
        temperature_slowdown_c: optional(
            warnings,
            gpu,
            "slowdown temperature",
            threshold(TemperatureThreshold::Slowdown),
        ),
        temperature_shutdown_c: optional(
            warnings,
            gpu,
            "shutdown temperature",
            threshold(TemperatureThreshold::Shutdown),
        ),
        power_limit_mw: optional(
            warnings,
            gpu,
            "enforced power limit",
            device.enforced_power_limit(),
        ),
        temperature_c: optional(
            warnings,
            gpu,
            "temperature",
            device.temperature(TemperatureSensor::Gpu),
        ),
        power_mw: optional(warnings, gpu, "power usage", device.power_usage()),
    }
}

fn read_gpu(device: &Device<'_>, index: u32, pci: &[PciEntry], warnings: &mut Warnings) -> Gpu {
    let name = optional(warnings, index, "name", device.name()).unwrap_or_else(|| "unknown".to_owned());
    let pci_info = optional(warnings, index, "PCI info", device.pci_info());
    let pci_bus_id = pci_info.as_ref().and_then(|p| pci::normalize_bus_id(&p.bus_id));
    let pci_device_id = pci_info
        .as_ref()
        .map(|p| format!("{:04x}", p.pci_device_id >> 16));
    let memory_bytes = optional(warnings, index, "memory", device.memory_info()).map(|m| m.total);
    let compute_capability = optional(
        warnings,
        index,
        "compute capability",
        device.cuda_compute_capability(),
    )
    .and_then(|c| {
        Some(ComputeCapability {
            major: u32::try_from(c.major).ok()?,
            minor: u32::try_from(c.minor).ok()?,
        })
    });
    let architecture = match device.architecture() {
        Ok(a) => Some(a),
        // Newer than this nvml-wrapper: fall back to the compute capability.
        Err(NvmlError::UnexpectedVariant(_) | NvmlError::NotSupported) => None,
        Err(e) => {
            warnings.push(format!("NVML GPU {index}: cannot read architecture: {e}"));
            None
        }
    };
    let mig_mode = optional(warnings, index, "MIG mode", device.mig_mode()).map(|m| MigMode {
        current: m.current == 1,
        pending: m.pending == 1,
    });
    let mig_devices = if mig_mode.is_some_and(|m| m.current) {
        mig_devices(device, index, memory_bytes, warnings)
    } else {
        Vec::new()
    };
    // Placement comes from sysfs, the same source as for NICs, so that the
    // two can be compared.
    let entry = pci_bus_id
        .as_deref()
        .and_then(|id| pci.iter().find(|e| e.device.address == id));
    Gpu {
        index,
        name,
        uuid: optional(warnings, index, "UUID", device.uuid()),
        memory_bytes,
        pci_bus_id,
        pci_device_id,
        architecture: family(architecture, compute_capability),
        compute_capability,
        mig_mode,
        mig_devices,
        nvlinks_active: nvlinks_active(device, index, warnings),
        numa_node: entry.and_then(|e| e.device.numa_node),
        // NVML can only see GPUs the driver has bound.
        driver_loaded: true,
        driver: entry
            .and_then(|e| e.device.driver.clone())
            .or_else(|| Some("nvidia".to_owned())),
        device_path: entry.map(|e| e.host_path.clone()),
        health: Some(read_health(device, index, warnings)),
    }
}

fn read_all(nvml: &Nvml, pci: &[PciEntry], warnings: &mut Warnings) -> Result<GpuInventory, GpuError> {
    let count = nvml.device_count().map_err(GpuError::Count)?;
    let driver_version = match nvml.sys_driver_version() {
        Ok(v) => Some(v),
        Err(e) => {
            warnings.push(format!("NVML: cannot read driver version: {e}"));
            None
        }
    };
    let cuda_driver_version = match nvml.sys_cuda_driver_version() {
        Ok(v) => Some(format!(
            "{}.{}",
            nvml_wrapper::cuda_driver_version_major(v),
            nvml_wrapper::cuda_driver_version_minor(v)
        )),
        Err(e) => {
            warnings.push(format!("NVML: cannot read CUDA driver version: {e}"));
            None
        }
    };
    let mut devices = Vec::new();
    for index in 0..count {
        match nvml.device_by_index(index) {
            Ok(device) => devices.push(read_gpu(&device, index, pci, warnings)),
            // One bad GPU (fallen off the bus, no permission) must not hide
            // the others.
            Err(e) => warnings.push(format!("NVML GPU {index}: cannot open device: {e}")),
        }
    }
    Ok(GpuInventory {
        source: GpuSource::Nvml,
        nvml_error: None,
        driver_version,
        cuda_driver_version,
        devices,
    })
}

/// Reads every GPU through NVML, loading the library from `library` or the
/// system default.
pub(super) fn discover(
    library: Option<&Path>,
    pci: &[PciEntry],
    warnings: &mut Warnings,
) -> Result<GpuInventory, GpuError> {
    let nvml = init(library)?;
    let result = read_all(&nvml, pci, warnings);
    shutdown(nvml, warnings);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const H100_BYTES: u64 = 81559 * MIB;
    const A100_40_BYTES: u64 = 40536 * MIB;

    #[test]
    fn profiles_match_nvidia_naming() {
        assert_eq!(mig_profile(1, 1, 9984, Some(H100_BYTES)), "1g.10gb");
        assert_eq!(mig_profile(2, 2, 20224, Some(H100_BYTES)), "2g.20gb");
        assert_eq!(mig_profile(3, 3, 40192, Some(H100_BYTES)), "3g.40gb");
        assert_eq!(mig_profile(4, 4, 40192, Some(H100_BYTES)), "4g.40gb");
        assert_eq!(mig_profile(7, 7, 81152, Some(H100_BYTES)), "7g.80gb");
        assert_eq!(mig_profile(1, 1, 4864, Some(A100_40_BYTES)), "1g.5gb");
        assert_eq!(mig_profile(3, 1, 40192, Some(H100_BYTES)), "1c.3g.40gb");
        assert_eq!(mig_profile(1, 1, 9984, None), "1g.10gb");
        // Absurd answers must not overflow.
        assert_eq!(
            mig_profile(1, 1, u64::MAX, Some(1)),
            format!("1g.{}gb", u128::from(u64::MAX) * u128::from(MIB))
        );
    }

    #[test]
    fn family_prefers_nvml_arch_then_compute_capability() {
        let cc = Some(ComputeCapability { major: 8, minor: 9 });
        assert_eq!(
            family(Some(DeviceArchitecture::Hopper), cc).as_deref(),
            Some("hopper")
        );
        assert_eq!(
            family(Some(DeviceArchitecture::Unknown), cc).as_deref(),
            Some("ada-lovelace")
        );
        assert_eq!(family(None, None), None);
    }
}
