// Whether this process may use AMX tiles, asked of the CPU and the OS at run time (whatever the
// build's own instructions): the OS saves the tiles' state (XCR0 bits 17 and 18, read by xgetbv once
// CPUID says the OS enabled it) and Linux grants this process the tile data (arch_prctl
// ARCH_REQ_XCOMP_PERM), asked once. The int4/int8 tile kernels and prompt attention's choice of
// PyTorch's attention on AMX (prompt_attention.cpp) both ask here.
#pragma once

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

inline bool amx_tile_state_granted() {
    static const bool granted = [] {
        unsigned int a = 0, b = 0, c = 0, d = 0;
        if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE: xgetbv works
        unsigned int eax = 0, edx = 0;
        asm volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
        if ((eax & 0x60000u) != 0x60000u) return false;
        constexpr long kRequestPermission = 0x1023, kTileData = 18;
        return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
    }();
    return granted;
}
