// What the emulated driver reads from NVRTC's CUBIN (an ELF file): the kernels it holds, with the
// static shared memory and registers ptxas gave each, so launches are checked against them.
#pragma once
#include <string>
#include <vector>

struct CubinKernel {
    std::string name;
    int static_smem = 0;
    int registers = 0;
};

bool parse_cubin(const void* image, std::vector<CubinKernel>* out, std::string* err);
