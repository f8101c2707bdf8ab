// Reads kernel names, static shared memory and register counts from a CUBIN's section table:
// `.text.<kernel>` holds a kernel's code (ptxas puts its register count in the top byte of
// sh_info), `.nv.shared.<kernel>` its static shared memory (sh_size).
#include "cubin.h"

#include <elf.h>

#include <cstring>
#include <map>

bool parse_cubin(const void* image, std::vector<CubinKernel>* out, std::string* err) {
    auto* base = static_cast<const unsigned char*>(image);
    auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64) {
        *err = "the image is not a 64-bit ELF CUBIN (PTX is not supported by the emulator)";
        return false;
    }
    auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
    if (eh->e_shstrndx >= eh->e_shnum) {
        *err = "the CUBIN has no section name table";
        return false;
    }
    const char* names = reinterpret_cast<const char*>(base + sh[eh->e_shstrndx].sh_offset);
    std::map<std::string, CubinKernel> kernels;
    std::map<std::string, int> shared;
    for (int i = 0; i < eh->e_shnum; ++i) {
        std::string n = names + sh[i].sh_name;
        if (n.rfind(".text.", 0) == 0) {
            CubinKernel& k = kernels[n.substr(6)];
            k.name = n.substr(6);
            k.registers = (int)(sh[i].sh_info >> 24);
        } else if (n.rfind(".nv.shared.", 0) == 0) {
            shared[n.substr(11)] = (int)sh[i].sh_size;
        }
    }
    for (auto& [name, k] : kernels) {
        auto it = shared.find(name);
        if (it != shared.end()) k.static_smem = it->second;
        out->push_back(k);
    }
    return true;
}
