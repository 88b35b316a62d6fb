// Renders a chat template with llama.cpp's own Jinja engine (common/jinja, what llama-server uses), so the
// GGUF test tier can check PhiClip's embedded template there. Built by scripts/llamacpp_setup.sh.
// usage: llamacpp-jinja-render TEMPLATE_FILE INPUT_JSON   (INPUT_JSON: {"messages": [...], "add_generation_prompt": ...})
#include "jinja/caps.h"
#include "jinja/lexer.h"
#include "jinja/parser.h"
#include "jinja/runtime.h"
#include "json.h"

#include <fstream>
#include <iostream>
#include <sstream>

static std::string read_file(const char * path) {
    std::ifstream file(path);
    std::stringstream text;
    text << file.rdbuf();
    return text.str();
}

int main(int argc, char ** argv) {
    if (argc != 3) {
        std::cerr << "usage: " << argv[0] << " TEMPLATE_FILE INPUT_JSON" << std::endl;
        return 2;
    }
    jinja::lexer lexer;
    auto lexed = lexer.tokenize(read_file(argv[1]));
    auto program = jinja::parse_from_tokens(lexed);
    std::cerr << jinja::caps_get(program).to_string() << std::endl;
    jinja::context ctx(lexed.source);
    jinja::global_from_json(ctx, common_json::parse(read_file(argv[2])), true);
    jinja::runtime runtime(ctx);
    const jinja::value result = runtime.execute(program);
    std::cout << jinja::runtime::gather_string_parts(result)->as_string().str();
    return 0;
}
