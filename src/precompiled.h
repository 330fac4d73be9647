// Headers precompiled once per target (CMakeLists.txt: target_precompile_headers) instead
// of parsed again in every translation unit: ~3 s each, minutes of a 2-core CI build.
// Only headers that many files use and that change never (the standard library, JSON).
// Nothing here is a dependency a file may rely on: each file still includes what it uses.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
