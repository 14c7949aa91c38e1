/*
 * A fake libnvidia-ml.so for tests: it exports, with the real NVML ABI, the
 * entry points that spokelet-hardware reaches through nvml-wrapper, and
 * answers like an HGX H100 board (8x H100 SXM5 80GB, driver 550.54.15,
 * CUDA 12.4, 18 active NVLinks per GPU).
 *
 * The PCI bus ids match the `hgx-h100` fixture tree, so a test that combines
 * this library with that tree exercises the NVML path and the sysfs topology
 * walk together.
 *
 * Variants (compile-time, so that each variant is a separate .so file and
 * therefore a separate dlopen handle with its own state):
 *   (none)          8 GPUs, MIG supported but disabled everywhere.
 *   -DSHIM_MIG      GPU 0 has MIG enabled with 3g.40gb + 2g.20gb + 2x 1g.10gb;
 *                   GPU 1 has MIG enable pending (takes effect after reset).
 *   -DSHIM_INIT_FAIL nvmlInit_v2 returns NVML_ERROR_DRIVER_NOT_LOADED.
 *
 * Health (every GPU, every variant): ECC on, no ECC error, no page pending
 * retirement, no row remapped, 35 C (slowdown at 87 C, shutdown at 92 C),
 * drawing 120 W against an enforced limit of 700 W. Row remapping is answered
 * through nvmlDeviceGetFieldValues (NVML_FI_DEV_REMAPPED_*), the call
 * nvml-wrapper's safe API reaches for it; pending page retirement is answered
 * too, so that both verdicts can be tested.
 *
 * Runtime state: at every nvmlInit_v2 the shim reads an optional file named
 * `state` in the directory the shim library itself was loaded from (found
 * with dladdr), so a running process's view changes without a rebuild: each
 * discovery initialises NVML, so the next discovery sees a change. One
 * `key=value` per line, <i> a GPU index 0-7:
 *   gpus=N                  devices NVML lists (0-8; fewer than 8 removes
 *                           GPUs from the end, as if fallen off the bus)
 *   ecc_uncorrected.<i>=N   uncorrected ECC errors (volatile and aggregate)
 *   retired_pending.<i>=0|1 pages pending retirement
 *   remap_pending.<i>=0|1   a row remapping pending
 *   temperature.<i>=C       GPU temperature in degrees Celsius
 *   power_mw.<i>=N          power draw in milliwatts
 * A missing file means the defaults above; malformed lines, unknown keys and
 * out-of-range indexes are ignored. spokelet_hardware::testing::
 * write_shim_state writes the file.
 *
 * Types are declared here rather than taken from nvml.h so that the shim
 * builds on machines without the CUDA toolkit; the layouts follow nvml.h
 * (and nvml-wrapper-sys, which is generated from it).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NVML_API __attribute__((visibility("default")))

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
};

#define NVML_DEVICE_ARCH_HOPPER 9u
#define NVML_NVLINK_MAX_LINKS 18u
#define NVML_FEATURE_DISABLED 0u
#define NVML_FEATURE_ENABLED 1u

typedef struct nvmlDevice_st *nvmlDevice_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

/* NVML_STRUCT_VERSION(Memory, 2) */
#define NVML_MEMORY_V2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

typedef union {
    double dVal;
    int siVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    long long sllVal;
    unsigned short usVal;
} nvmlValue_t;

typedef struct {
    unsigned int fieldId;
    unsigned int scopeId;
    long long timestamp;
    long long latencyUsec;
    unsigned int valueType; /* nvmlValueType_t */
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;

#define NVML_VALUE_TYPE_UNSIGNED_INT 1u
#define NVML_FI_DEV_REMAPPED_COR 142u
#define NVML_FI_DEV_REMAPPED_UNC 143u
#define NVML_FI_DEV_REMAPPED_PENDING 144u
#define NVML_FI_DEV_REMAPPED_FAILURE 145u

#define NVML_MEMORY_ERROR_TYPE_CORRECTED 0u
#define NVML_MEMORY_ERROR_TYPE_UNCORRECTED 1u
#define NVML_VOLATILE_ECC 0u
#define NVML_AGGREGATE_ECC 1u
#define NVML_TEMPERATURE_GPU 0u
#define NVML_TEMPERATURE_THRESHOLD_SHUTDOWN 0u
#define NVML_TEMPERATURE_THRESHOLD_SLOWDOWN 1u

typedef struct {
    unsigned int multiprocessorCount;
    unsigned int sharedCopyEngineCount;
    unsigned int sharedDecoderCount;
    unsigned int sharedEncoderCount;
    unsigned int sharedJpegCount;
    unsigned int sharedOfaCount;
    unsigned int gpuInstanceSliceCount;
    unsigned int computeInstanceSliceCount;
    unsigned long long memorySizeMB;
} nvmlDeviceAttributes_t;

/* One physical GPU or one MIG device; handles are pointers into the tables
 * below, which is also how the real library hands them out (opaque
 * pointers). */
struct nvmlDevice_st {
    int is_mig;
    unsigned int bus;         /* PCI bus number, domain 0, device 0, fn 0 */
    unsigned int mig_current; /* physical GPUs only */
    unsigned int mig_pending;
    char uuid[96];
    unsigned long long memory_mib;
    unsigned int sm_count;
    unsigned int gi_slices;
    unsigned int ci_slices;
    /* Health, physical GPUs only; reset and re-read from `state` at every init. */
    unsigned long long ecc_uncorrected;
    unsigned int retired_pending;
    unsigned int remap_pending;
    unsigned int temperature_c;
    unsigned int power_mw;
};

#define GPU_COUNT 8
#define MIG_MAX 7

static struct nvmlDevice_st gpus[GPU_COUNT];
static struct nvmlDevice_st migs[MIG_MAX];
static unsigned int mig_count;
static int init_count;
/* GPUs NVML lists: the first `visible_count` of `gpus`. */
static unsigned int visible_count = GPU_COUNT;

/* Bus numbers of the GPUs in the hgx-h100 fixture, in NVML (PCI) order. */
static const unsigned int gpu_bus[GPU_COUNT] = {0x1b, 0x43, 0x52, 0x61, 0x9d, 0xc3, 0xd1, 0xdf};

static const unsigned long long H100_MEMORY_MIB = 81559ull;

/* Healthy H100 SXM5 readings and limits. */
#define DEFAULT_TEMPERATURE_C 35u
#define SLOWDOWN_C 87u
#define SHUTDOWN_C 92u
#define DEFAULT_POWER_MW 120000u
#define POWER_LIMIT_MW 700000u

__attribute__((unused)) static void setup(void) {
    for (unsigned int i = 0; i < GPU_COUNT; i++) {
        struct nvmlDevice_st *g = &gpus[i];
        memset(g, 0, sizeof(*g));
        g->bus = gpu_bus[i];
        snprintf(g->uuid, sizeof g->uuid, "GPU-9f1c2d3e-4b5a-6978-8a9b-0c1d2e3f40%02u", i);
        g->memory_mib = H100_MEMORY_MIB;
        g->sm_count = 132;
        g->gi_slices = 0;
        g->ci_slices = 0;
    }
    mig_count = 0;
#ifdef SHIM_MIG
    gpus[0].mig_current = 1;
    gpus[0].mig_pending = 1;
    gpus[1].mig_current = 0;
    gpus[1].mig_pending = 1;
    /* H100 80GB profile sizes as nvidia-smi mig -lgip reports them. */
    static const struct {
        unsigned int slices;
        unsigned long long mib;
        unsigned int sms;
    } layout[] = {{3, 40192, 60}, {2, 20224, 32}, {1, 9984, 16}, {1, 9984, 16}};
    for (unsigned int i = 0; i < sizeof layout / sizeof layout[0]; i++) {
        struct nvmlDevice_st *m = &migs[mig_count++];
        memset(m, 0, sizeof(*m));
        m->is_mig = 1;
        m->bus = gpus[0].bus;
        snprintf(m->uuid, sizeof m->uuid, "MIG-2b7a1c4d-5e6f-5a0b-9c8d-7e6f5a4b3c%02u", i);
        m->memory_mib = layout[i].mib;
        m->sm_count = layout[i].sms;
        m->gi_slices = layout[i].slices;
        m->ci_slices = layout[i].slices;
    }
#endif
}

static void health_defaults(void) {
    visible_count = GPU_COUNT;
    for (unsigned int i = 0; i < GPU_COUNT; i++) {
        gpus[i].ecc_uncorrected = 0;
        gpus[i].retired_pending = 0;
        gpus[i].remap_pending = 0;
        gpus[i].temperature_c = DEFAULT_TEMPERATURE_C;
        gpus[i].power_mw = DEFAULT_POWER_MW;
    }
}

/* A whole decimal number, no sign or trailing text; -1 when malformed. */
static int parse_number(const char *text, unsigned long long *out) {
    if (text[0] < '0' || text[0] > '9')
        return -1;
    char *end = NULL;
    unsigned long long v = strtoull(text, &end, 10);
    if (end == NULL || *end != '\0')
        return -1;
    *out = v;
    return 0;
}

/* `<name>.<i>` for a GPU index in range: the index, or -1. */
static int indexed(const char *key, const char *name) {
    size_t len = strlen(name);
    unsigned long long i;
    if (strncmp(key, name, len) != 0 || key[len] != '.' || parse_number(key + len + 1, &i) != 0 ||
        i >= GPU_COUNT)
        return -1;
    return (int)i;
}

static unsigned int clamp_u32(unsigned long long v) {
    return v > 0xffffffffull ? 0xffffffffu : (unsigned int)v;
}

static void apply_line(char *line) {
    line[strcspn(line, "\r\n")] = '\0';
    char *eq = strchr(line, '=');
    unsigned long long v;
    if (eq == NULL)
        return;
    *eq = '\0';
    if (parse_number(eq + 1, &v) != 0)
        return;
    int i;
    if (strcmp(line, "gpus") == 0) {
        if (v <= GPU_COUNT)
            visible_count = (unsigned int)v;
    } else if ((i = indexed(line, "ecc_uncorrected")) >= 0) {
        gpus[i].ecc_uncorrected = v;
    } else if ((i = indexed(line, "retired_pending")) >= 0) {
        if (v <= 1)
            gpus[i].retired_pending = (unsigned int)v;
    } else if ((i = indexed(line, "remap_pending")) >= 0) {
        if (v <= 1)
            gpus[i].remap_pending = (unsigned int)v;
    } else if ((i = indexed(line, "temperature")) >= 0) {
        gpus[i].temperature_c = clamp_u32(v);
    } else if ((i = indexed(line, "power_mw")) >= 0) {
        gpus[i].power_mw = clamp_u32(v);
    }
}

/* Resets the health state, then applies `state` next to this library. */
__attribute__((unused)) static void load_state(void) {
    health_defaults();
    Dl_info info;
    if (dladdr((void *)&load_state, &info) == 0 || info.dli_fname == NULL)
        return;
    char path[4096];
    const char *slash = strrchr(info.dli_fname, '/');
    int dir_len = slash == NULL ? 0 : (int)(slash - info.dli_fname + 1);
    int n = snprintf(path, sizeof path, "%.*sstate", dir_len, info.dli_fname);
    if (n < 0 || (size_t)n >= sizeof path)
        return;
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    char line[256];
    while (fgets(line, sizeof line, f) != NULL) {
        if (strchr(line, '\n') == NULL && !feof(f)) {
            /* Longer than any valid line: skip the rest of it. */
            int c;
            while ((c = fgetc(f)) != EOF && c != '\n') {
            }
            continue;
        }
        apply_line(line);
    }
    fclose(f);
}

static int is_gpu(nvmlDevice_t d) {
    return d >= &gpus[0] && d < &gpus[GPU_COUNT];
}

static int is_mig(nvmlDevice_t d) {
    return d >= &migs[0] && d < &migs[mig_count];
}

static int valid(nvmlDevice_t d) {
    return is_gpu(d) || is_mig(d);
}

static nvmlReturn_t copy_string(char *dst, unsigned int len, const char *src) {
    if (dst == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (strlen(src) + 1 > len) {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

#define REQUIRE_INIT()                                                                             \
    do {                                                                                           \
        if (init_count == 0)                                                                       \
            return NVML_ERROR_UNINITIALIZED;                                                       \
    } while (0)

#define REQUIRE_DEVICE(d)                                                                          \
    do {                                                                                           \
        REQUIRE_INIT();                                                                            \
        if (!valid(d))                                                                             \
            return NVML_ERROR_INVALID_ARGUMENT;                                                    \
    } while (0)

NVML_API nvmlReturn_t nvmlInit_v2(void) {
#ifdef SHIM_INIT_FAIL
    return NVML_ERROR_DRIVER_NOT_LOADED;
#else
    if (init_count++ == 0) {
        setup();
    }
    load_state();
    return NVML_SUCCESS;
#endif
}

NVML_API nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    return nvmlInit_v2();
}

NVML_API nvmlReturn_t nvmlShutdown(void) {
    REQUIRE_INIT();
    init_count--;
    return NVML_SUCCESS;
}

NVML_API const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS:
        return "Success";
    case NVML_ERROR_UNINITIALIZED:
        return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT:
        return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED:
        return "Not Supported";
    case NVML_ERROR_NOT_FOUND:
        return "Not Found";
    case NVML_ERROR_DRIVER_NOT_LOADED:
        return "Driver Not Loaded";
    default:
        return "Unknown Error";
    }
}

NVML_API nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    REQUIRE_INIT();
    return copy_string(version, length, "550.54.15");
}

NVML_API nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    REQUIRE_INIT();
    return copy_string(version, length, "12.550.54.15");
}

NVML_API nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *cudaDriverVersion) {
    if (cudaDriverVersion == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *cudaDriverVersion = 12040;
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *cudaDriverVersion) {
    return nvmlSystemGetCudaDriverVersion(cudaDriverVersion);
}

NVML_API nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount) {
    REQUIRE_INIT();
    if (deviceCount == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *deviceCount = visible_count;
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    REQUIRE_INIT();
    if (device == NULL || index >= visible_count)
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = &gpus[index];
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    REQUIRE_DEVICE(device);
    if (index == NULL || !is_gpu(device))
        return NVML_ERROR_INVALID_ARGUMENT;
    *index = (unsigned int)(device - &gpus[0]);
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    REQUIRE_DEVICE(device);
    if (device->is_mig) {
        char buf[96];
        snprintf(buf, sizeof buf, "NVIDIA H100 80GB HBM3 MIG %ug.%llugb", device->gi_slices,
                 (device->memory_mib + 1023) / 1024);
        return copy_string(name, length, buf);
    }
    return copy_string(name, length, "NVIDIA H100 80GB HBM3");
}

NVML_API nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    REQUIRE_DEVICE(device);
    return copy_string(uuid, length, device->uuid);
}

NVML_API nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    REQUIRE_DEVICE(device);
    if (memory == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != NVML_MEMORY_V2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    unsigned long long total = device->memory_mib * 1024ull * 1024ull;
    memory->total = total;
    memory->reserved = 512ull * 1024ull * 1024ull;
    memory->used = 0;
    memory->free = total - memory->reserved;
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    REQUIRE_DEVICE(device);
    if (pci == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    memset(pci, 0, sizeof(*pci));
    pci->domain = 0;
    pci->bus = device->bus;
    pci->device = 0;
    pci->pciDeviceId = 0x233010deu;    /* H100 SXM5 80GB */
    pci->pciSubSystemId = 0x16c110deu;
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", device->bus);
    snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", device->bus);
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major,
                                                         int *minor) {
    REQUIRE_DEVICE(device);
    if (major == NULL || minor == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *major = 9;
    *minor = 0;
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetArchitecture(nvmlDevice_t device, unsigned int *arch) {
    REQUIRE_DEVICE(device);
    if (arch == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *arch = NVML_DEVICE_ARCH_HOPPER;
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode,
                                           unsigned int *pendingMode) {
    REQUIRE_DEVICE(device);
    if (currentMode == NULL || pendingMode == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->is_mig)
        return NVML_ERROR_NOT_SUPPORTED;
    *currentMode = device->mig_current;
    *pendingMode = device->mig_pending;
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    REQUIRE_DEVICE(device);
    if (count == NULL || device->is_mig)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = device->mig_current ? MIG_MAX : 0;
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                                          nvmlDevice_t *migDevice) {
    REQUIRE_DEVICE(device);
    if (migDevice == NULL || device->is_mig || index >= MIG_MAX)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!device->mig_current)
        return NVML_ERROR_NOT_SUPPORTED;
    /* Unused slots answer NOT_FOUND, as the real library does. */
    if (device != &gpus[0] || index >= mig_count)
        return NVML_ERROR_NOT_FOUND;
    *migDevice = &migs[index];
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice) {
    REQUIRE_DEVICE(device);
    if (isMigDevice == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *isMigDevice = device->is_mig ? 1u : 0u;
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetAttributes_v2(nvmlDevice_t device,
                                                 nvmlDeviceAttributes_t *attributes) {
    REQUIRE_DEVICE(device);
    if (attributes == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    /* The real library only answers for MIG device handles. */
    if (!device->is_mig)
        return NVML_ERROR_NOT_SUPPORTED;
    memset(attributes, 0, sizeof(*attributes));
    attributes->multiprocessorCount = device->sm_count;
    attributes->sharedCopyEngineCount = device->gi_slices;
    attributes->sharedDecoderCount = device->gi_slices;
    attributes->gpuInstanceSliceCount = device->gi_slices;
    attributes->computeInstanceSliceCount = device->ci_slices;
    attributes->memorySizeMB = device->memory_mib;
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link,
                                               unsigned int *isActive) {
    REQUIRE_DEVICE(device);
    if (isActive == NULL || link >= NVML_NVLINK_MAX_LINKS)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->is_mig)
        return NVML_ERROR_NOT_SUPPORTED;
    *isActive = NVML_FEATURE_ENABLED;
    return NVML_SUCCESS;
}

/* Health queries answer for physical GPUs only (discovery asks them of no MIG
 * device). */
#define REQUIRE_PHYSICAL(d, out)                                                                   \
    do {                                                                                           \
        REQUIRE_DEVICE(d);                                                                         \
        if ((out) == NULL)                                                                         \
            return NVML_ERROR_INVALID_ARGUMENT;                                                    \
        if ((d)->is_mig)                                                                           \
            return NVML_ERROR_NOT_SUPPORTED;                                                       \
    } while (0)

NVML_API nvmlReturn_t nvmlDeviceGetEccMode(nvmlDevice_t device, unsigned int *current,
                                           unsigned int *pending) {
    REQUIRE_PHYSICAL(device, current);
    if (pending == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *current = NVML_FEATURE_ENABLED;
    *pending = NVML_FEATURE_ENABLED;
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, unsigned int errorType,
                                                  unsigned int counterType,
                                                  unsigned long long *eccCounts) {
    REQUIRE_PHYSICAL(device, eccCounts);
    if (counterType != NVML_VOLATILE_ECC && counterType != NVML_AGGREGATE_ECC)
        return NVML_ERROR_INVALID_ARGUMENT;
    switch (errorType) {
    case NVML_MEMORY_ERROR_TYPE_CORRECTED:
        *eccCounts = 0;
        return NVML_SUCCESS;
    case NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
        /* Errors since the driver loaded count towards the lifetime total too. */
        *eccCounts = device->ecc_uncorrected;
        return NVML_SUCCESS;
    default:
        return NVML_ERROR_INVALID_ARGUMENT;
    }
}

NVML_API nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t device,
                                                             unsigned int *isPending) {
    REQUIRE_PHYSICAL(device, isPending);
    *isPending = device->retired_pending ? NVML_FEATURE_ENABLED : NVML_FEATURE_DISABLED;
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, unsigned int sensorType,
                                               unsigned int *temp) {
    REQUIRE_PHYSICAL(device, temp);
    if (sensorType != NVML_TEMPERATURE_GPU)
        return NVML_ERROR_INVALID_ARGUMENT;
    *temp = device->temperature_c;
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetTemperatureThreshold(nvmlDevice_t device,
                                                        unsigned int thresholdType,
                                                        unsigned int *temp) {
    REQUIRE_PHYSICAL(device, temp);
    switch (thresholdType) {
    case NVML_TEMPERATURE_THRESHOLD_SHUTDOWN:
        *temp = SHUTDOWN_C;
        return NVML_SUCCESS;
    case NVML_TEMPERATURE_THRESHOLD_SLOWDOWN:
        *temp = SLOWDOWN_C;
        return NVML_SUCCESS;
    default:
        return NVML_ERROR_NOT_SUPPORTED;
    }
}

NVML_API nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    REQUIRE_PHYSICAL(device, power);
    *power = device->power_mw;
    return NVML_SUCCESS;
}

NVML_API nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit) {
    REQUIRE_PHYSICAL(device, limit);
    *limit = POWER_LIMIT_MW;
    return NVML_SUCCESS;
}

/* Only the row remapping fields are known; every other field answers
 * NOT_SUPPORTED in its own nvmlReturn, as the real library does. */
NVML_API nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int valuesCount,
                                               nvmlFieldValue_t *values) {
    REQUIRE_PHYSICAL(device, values);
    if (valuesCount < 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < valuesCount; i++) {
        nvmlFieldValue_t *v = &values[i];
        v->scopeId = 0;
        v->timestamp = 0;
        v->latencyUsec = 0;
        v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
        v->nvmlReturn = NVML_SUCCESS;
        v->value.ullVal = 0;
        switch (v->fieldId) {
        case NVML_FI_DEV_REMAPPED_COR:
        case NVML_FI_DEV_REMAPPED_UNC:
        case NVML_FI_DEV_REMAPPED_FAILURE:
            v->value.uiVal = 0;
            break;
        case NVML_FI_DEV_REMAPPED_PENDING:
            v->value.uiVal = device->remap_pending;
            break;
        default:
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            break;
        }
    }
    return NVML_SUCCESS;
}
