/*
 * kvm-smoke: checks that /dev/kvm works, for the nested harness (resources/nested/selftest.sh).
 *
 *   kvm-smoke [LOOP_ITERATIONS]
 *
 * Opens /dev/kvm, reads KVM_GET_API_VERSION, creates a VM, prints a few capabilities and the
 * paravirtual CPUID leaves KVM offers (what an L2 kernel needs for kvm-clock), then runs a tiny
 * real-mode guest: a `dec ecx / jnz` loop of LOOP_ITERATIONS (default 10000000), `out 0x10, al` with
 * al = 0x42, and `hlt`. Each result is one `KVM-SMOKE key=value` line. Exits 0 when every step
 * worked and the guest exited with the expected port write and halt, 1 otherwise.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static int failures;

static void fail(const char *what)
{
    printf("KVM-SMOKE error=%s errno=%d (%s)\n", what, errno, strerror(errno));
    failures++;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void print_cpuid(int kvm)
{
    enum { N = 256 };
    struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + N * sizeof(struct kvm_cpuid_entry2));
    if (!c) {
        fail("calloc");
        return;
    }
    c->nent = N;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, c) < 0) {
        fail("KVM_GET_SUPPORTED_CPUID");
        free(c);
        return;
    }
    printf("KVM-SMOKE supported_cpuid_entries=%u\n", c->nent);
    for (unsigned i = 0; i < c->nent; i++) {
        const struct kvm_cpuid_entry2 *e = &c->entries[i];
        if (e->function == 0x40000000) {
            char sig[13];
            memcpy(sig, &e->ebx, 4);
            memcpy(sig + 4, &e->ecx, 4);
            memcpy(sig + 8, &e->edx, 4);
            sig[12] = 0;
            printf("KVM-SMOKE cpuid_40000000 max_leaf=0x%x signature=%s\n", e->eax, sig);
        } else if (e->function == 0x40000001) {
            printf("KVM-SMOKE cpuid_40000001 features_eax=0x%x hints_edx=0x%x"
                   " clocksource2=%u stable_bit=%u\n",
                   e->eax, e->edx, (e->eax >> 3) & 1, (e->eax >> 24) & 1);
        } else if (e->function == 0x40000010) {
            printf("KVM-SMOKE cpuid_40000010 tsc_khz=%u apic_khz=%u\n", e->eax, e->ebx);
        } else if (e->function == 1) {
            printf("KVM-SMOKE cpuid_1 ecx=0x%x x2apic=%u tsc_deadline=%u xsave=%u cx16=%u hypervisor=%u\n",
                   e->ecx, (e->ecx >> 21) & 1, (e->ecx >> 24) & 1, (e->ecx >> 26) & 1, (e->ecx >> 13) & 1,
                   (e->ecx >> 31) & 1);
        } else if (e->function == 0x80000007) {
            printf("KVM-SMOKE cpuid_80000007 edx=0x%x invariant_tsc=%u\n", e->edx, (e->edx >> 8) & 1);
        }
    }
    free(c);
}

int main(int argc, char **argv)
{
    uint32_t loops = 10000000;
    if (argc > 1)
        loops = (uint32_t)strtoul(argv[1], NULL, 10);
    if (loops == 0)
        loops = 1;

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        fail("open_dev_kvm");
        return 1;
    }
    int api = ioctl(kvm, KVM_GET_API_VERSION, 0);
    printf("KVM-SMOKE api_version=%d\n", api);
    if (api != KVM_API_VERSION)
        failures++;

    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) {
        fail("KVM_CREATE_VM");
        return 1;
    }
    printf("KVM-SMOKE create_vm=ok fd=%d\n", vm);

    static const struct {
        const char *name;
        int cap;
    } caps[] = {
        { "user_memory", KVM_CAP_USER_MEMORY },   { "irqchip", KVM_CAP_IRQCHIP },
        { "ioeventfd", KVM_CAP_IOEVENTFD },       { "irqfd", KVM_CAP_IRQFD },
        { "nr_memslots", KVM_CAP_NR_MEMSLOTS },   { "max_vcpus", KVM_CAP_MAX_VCPUS },
        { "tsc_control", KVM_CAP_TSC_CONTROL },   { "get_tsc_khz", KVM_CAP_GET_TSC_KHZ },
        { "adjust_clock", KVM_CAP_ADJUST_CLOCK }, { "pit2", KVM_CAP_PIT2 },
        { "kvmclock_ctrl", KVM_CAP_KVMCLOCK_CTRL }, { "tsc_deadline_timer", KVM_CAP_TSC_DEADLINE_TIMER },
    };
    for (size_t i = 0; i < sizeof(caps) / sizeof(caps[0]); i++)
        printf("KVM-SMOKE cap_%s=%d\n", caps[i].name, ioctl(kvm, KVM_CHECK_EXTENSION, caps[i].cap));
    print_cpuid(kvm);

    /* One page of guest memory at 0x1000 holding the real-mode program. */
    uint8_t *mem = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        fail("mmap_guest");
        return 1;
    }
    const uint8_t code[] = {
        0x66, 0xb9, (uint8_t)loops, (uint8_t)(loops >> 8), (uint8_t)(loops >> 16),
        (uint8_t)(loops >> 24), /* mov ecx, loops */
        0x66, 0x49,             /* loop: dec ecx */
        0x75, 0xfc,             /* jnz loop */
        0xb0, 0x42,             /* mov al, 0x42 */
        0xe6, 0x10,             /* out 0x10, al */
        0xf4,                   /* hlt */
    };
    memcpy(mem, code, sizeof(code));
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0x1000, .memory_size = 0x1000, .userspace_addr = (uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
        fail("KVM_SET_USER_MEMORY_REGION");
        return 1;
    }
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) {
        fail("KVM_CREATE_VCPU");
        return 1;
    }
    int tsc_khz = ioctl(vcpu, KVM_GET_TSC_KHZ, 0);
    printf("KVM-SMOKE vcpu_tsc_khz=%d\n", tsc_khz);
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size <= 0) {
        fail("KVM_GET_VCPU_MMAP_SIZE");
        return 1;
    }
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) {
        fail("mmap_kvm_run");
        return 1;
    }
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) {
        fail("KVM_GET_SREGS");
        return 1;
    }
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) {
        fail("KVM_SET_SREGS");
        return 1;
    }
    struct kvm_regs regs = { .rip = 0x1000, .rflags = 0x2 };
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) {
        fail("KVM_SET_REGS");
        return 1;
    }

    int saw_out = 0, saw_hlt = 0;
    double t0 = now_s(), t_out = 0;
    for (int i = 0; i < 8 && !saw_hlt; i++) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            fail("KVM_RUN");
            break;
        }
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            uint8_t v = *((uint8_t *)run + run->io.data_offset);
            t_out = now_s();
            printf("KVM-SMOKE exit=io port=0x%x dir=%s value=0x%x loop_iterations=%u loop_s=%.3f\n",
                   run->io.port, run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in", v, loops, t_out - t0);
            saw_out = run->io.port == 0x10 && v == 0x42;
            break;
        }
        case KVM_EXIT_HLT:
            printf("KVM-SMOKE exit=hlt\n");
            saw_hlt = 1;
            break;
        default:
            printf("KVM-SMOKE exit=unexpected reason=%u\n", run->exit_reason);
            failures++;
            i = 8;
            break;
        }
    }
    if (!saw_out || !saw_hlt)
        failures++;
    printf("KVM-SMOKE result=%s\n", failures ? "FAIL" : "PASS");
    return failures ? 1 : 0;
}
