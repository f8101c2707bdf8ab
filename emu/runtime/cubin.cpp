// Reads kernel names, static shared memory and register counts from a CUBIN's sections:
// `.text.<kernel>` holds a kernel's code, `.nv.shared.<kernel>` its static shared memory
// (sh_size), and the global `.nv.info` section one EIATTR_REGCOUNT record (attribute 0x2f,
// value: symbol index and count) per kernel.
#include "cubin.h"

#include <elf.h>

#include <cstring>
#include <map>

namespace {
constexpr unsigned char EIFMT_BVAL = 0x02, EIFMT_HVAL = 0x03, EIFMT_SVAL = 0x04;
constexpr unsigned char EIATTR_REGCOUNT = 0x2f;
}  // namespace

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
    const Elf64_Shdr *info = nullptr, *symtab = nullptr;
    for (int i = 0; i < eh->e_shnum; ++i) {
        std::string n = names + sh[i].sh_name;
        if (n.rfind(".text.", 0) == 0) {
            kernels[n.substr(6)].name = n.substr(6);
        } else if (n.rfind(".nv.shared.", 0) == 0) {
            shared[n.substr(11)] = (int)sh[i].sh_size;
        } else if (n == ".nv.info") {
            info = &sh[i];
        } else if (sh[i].sh_type == SHT_SYMTAB) {
            symtab = &sh[i];
        }
    }
    if (info && symtab && symtab->sh_link < eh->e_shnum) {
        auto* syms = reinterpret_cast<const Elf64_Sym*>(base + symtab->sh_offset);
        size_t nsyms = symtab->sh_size / sizeof(Elf64_Sym);
        const char* strtab = reinterpret_cast<const char*>(base + sh[symtab->sh_link].sh_offset);
        const unsigned char* d = base + info->sh_offset;
        for (size_t i = 0; i + 2 <= info->sh_size;) {
            unsigned char fmt = d[i], attr = d[i + 1];
            if (fmt == EIFMT_SVAL) {
                uint16_t size;
                memcpy(&size, d + i + 2, 2);
                if (attr == EIATTR_REGCOUNT && size >= 8) {
                    uint32_t sym, regs;
                    memcpy(&sym, d + i + 4, 4);
                    memcpy(&regs, d + i + 8, 4);
                    if (sym < nsyms) {
                        auto it = kernels.find(strtab + syms[sym].st_name);
                        if (it != kernels.end()) it->second.registers = (int)regs;
                    }
                }
                i += 4 + size;
            } else if (fmt == EIFMT_HVAL) {
                i += 4;
            } else if (fmt == EIFMT_BVAL) {
                i += 3;
            } else {
                i += 2;
            }
        }
    }
    for (auto& [name, k] : kernels) {
        auto it = shared.find(name);
        if (it != shared.end()) k.static_smem = it->second;
        out->push_back(k);
    }
    return true;
}
