// __nv_bfloat16 and its conversions, for the emulated build: tests/emu/cuda_emu.h has them.
#pragma once
#include "../cuda_emu.h"
