// nvcuda::wmma for the emulated build: tests/emu/cuda_emu.h emulates it by its definition.
#pragma once
#include "../cuda_emu.h"
