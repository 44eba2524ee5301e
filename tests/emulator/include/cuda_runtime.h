// Stand-in for the CUDA runtime header in the emulator build (tests/emulator).
#pragma once
#include "../runtime.h"
