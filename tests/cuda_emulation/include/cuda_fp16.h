// CPU emulation stand-in: 16-bit storage types only (the emulated WMMA converts them).
#pragma once
#include <cstdint>
struct __half { uint16_t bits; };
