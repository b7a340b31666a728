// The tokenizer of tokenizer.json files: word-level ones here, SentencePiece (Unigram) ones through the
// sentencepiece library (see tokenizer.hpp for what is supported).
#include "foresight/tokenizer.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#ifdef FORESIGHT_HAVE_SENTENCEPIECE
#include <sentencepiece_processor.h>
#endif

namespace foresight {
namespace {

using json = nlohmann::json;

// The Whitespace pre-tokenizer's classes (its pattern is \w+|[^\w\s]+) on ASCII: word characters,
// Unicode White_Space (tab..carriage return, space), and everything else.
enum class Kind { word, space, other };

Kind kind_of(unsigned char c) {
  if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') return Kind::word;
  if (c == ' ' || (c >= '\t' && c <= '\r')) return Kind::space;
  return Kind::other;
}

std::string type_of(const json& node) {
  return node.is_object() && node.contains("type") ? node.at("type").get<std::string>() : std::string("none");
}

// The type names of a node and, for a Sequence, of its members.
std::vector<std::string> types_in(const json& node, const char* members) {
  if (type_of(node) != "Sequence") return {type_of(node)};
  std::vector<std::string> out;
  for (const auto& m : node.at(members)) out.push_back(type_of(m));
  return out;
}

// Whole valid UTF-8 (what the sentencepiece library reads; it would replace invalid bytes silently).
bool valid_utf8(const std::string& text) {
  for (size_t i = 0; i < text.size();) {
    const unsigned char c = text[i];
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    if (n == 0 || i + n > text.size()) return false;
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(text[i + k]) >> 6) != 0x2) return false;
    i += n;
  }
  return true;
}

}  // namespace

bool has_sentencepiece() {
#ifdef FORESIGHT_HAVE_SENTENCEPIECE
  return true;
#else
  return false;
#endif
}

Tokenizer Tokenizer::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw TokenizerError("cannot read the tokenizer file " + path);
  std::stringstream text;
  text << in.rdbuf();
  const std::filesystem::path spm = std::filesystem::path(path).parent_path() / "spiece.model";
  return from_json(text.str(), path, std::filesystem::is_regular_file(spm) ? spm.string() : "");
}

Tokenizer Tokenizer::from_json(const std::string& text, const std::string& where, const std::string& spm_path) {
  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::exception& e) {
    throw TokenizerError(where + " is not valid JSON: " + e.what());
  }
  const std::string unsupported = " (this runtime reads word-level tokenizers and, built with sentencepiece, "
                                  "SentencePiece Unigram ones)";
  Tokenizer t;
  const json& model = doc.at("model");
  if (type_of(model) == "Unigram") {  // a SentencePiece model converted to tokenizer.json (T5, UMT5)
    if (!has_sentencepiece())
      throw TokenizerError(where + ": model Unigram (a SentencePiece tokenizer) needs the sentencepiece build: install "
                           "libsentencepiece-dev and rebuild cpp/");
    if (spm_path.empty())
      throw TokenizerError(where + ": model Unigram is read from the SentencePiece model it was converted from, and "
                           "there is no spiece.model next to it");
    // What the conversion writes: sentencepiece's own normalization and whitespace handling, which the
    // library applies itself (the tests check the two give the same ids).
    const auto norm = types_in(doc.value("normalizer", json()), "normalizers");
    const auto pre = types_in(doc.value("pre_tokenizer", json()), "pretokenizers");
    const bool norm_ok = std::all_of(norm.begin(), norm.end(), [](const std::string& n) {
      return n == "Precompiled" || n == "Replace" || n == "none";
    });
    const bool pre_ok = pre.back() == "Metaspace" && std::all_of(pre.begin(), pre.end() - 1, [](const std::string& n) {
      return n == "WhitespaceSplit";
    });
    if (!norm_ok || !pre_ok)
      throw TokenizerError(where + ": a Unigram tokenizer with normalizer " + type_of(doc.value("normalizer", json())) +
                           " and pre_tokenizer " + type_of(doc.value("pre_tokenizer", json())) +
                           " is not the SentencePiece conversion this runtime reads");
#ifdef FORESIGHT_HAVE_SENTENCEPIECE
    auto processor = std::make_shared<sentencepiece::SentencePieceProcessor>();
    const auto status = processor->Load(spm_path);
    if (!status.ok()) throw TokenizerError(spm_path + " is not a SentencePiece model: " + status.ToString());
    // The model's pieces are the SentencePiece model's, then (T5's <extra_id_N>) special added tokens.
    const auto& pieces = model.at("vocab");
    std::set<std::string> specials;
    for (const auto& token : doc.value("added_tokens", json::array()))
      if (token.value("special", false)) specials.insert(token.at("content").get<std::string>());
    if (static_cast<int>(pieces.size()) < processor->GetPieceSize())
      throw TokenizerError(where + " has " + std::to_string(pieces.size()) + " pieces and " + spm_path + " " +
                           std::to_string(processor->GetPieceSize()) + ": they are not the same tokenizer");
    for (size_t id = 0; id < pieces.size(); ++id) {
      const std::string piece = pieces[id].at(0).get<std::string>();
      if (static_cast<int>(id) >= processor->GetPieceSize()) {
        if (!specials.count(piece))
          throw TokenizerError(where + ": piece " + std::to_string(id) + " (\"" + piece + "\") is neither in " +
                               spm_path + " nor a special added token");
      } else if (processor->IdToPiece(static_cast<int>(id)) != piece)
        throw TokenizerError(where + ": piece " + std::to_string(id) + " is \"" + piece + "\" there and \"" +
                             processor->IdToPiece(static_cast<int>(id)) + "\" in " + spm_path +
                             ": they are not the same tokenizer");
      t.vocab_[piece] = static_cast<int64_t>(id);
    }
    t.spm_ = processor;
#endif
  } else if (type_of(model) == "WordLevel") {
    for (const auto& [word, id] : model.at("vocab").items()) t.vocab_[word] = id.get<int64_t>();
    if (model.contains("unk_token") && !model.at("unk_token").is_null()) {
      const auto unk = t.vocab_.find(model.at("unk_token").get<std::string>());
      if (unk != t.vocab_.end()) t.unk_id_ = unk->second;
    }
    const std::string normalizer = type_of(doc.value("normalizer", json()));
    if (normalizer == "Lowercase") {
      t.lowercase_ = true;
    } else if (normalizer != "none") {
      throw TokenizerError(where + ": normalizer " + normalizer + " is not supported" + unsupported);
    }
    const std::string pre = type_of(doc.value("pre_tokenizer", json()));
    if (pre != "Whitespace") throw TokenizerError(where + ": pre_tokenizer " + pre + " is not supported" + unsupported);
  } else {
    throw TokenizerError(where + ": model " + type_of(model) + " is not supported" + unsupported);
  }
  for (const auto& token : doc.value("added_tokens", json::array())) {
    if (!token.value("special", false)) continue;
    if (token.value("normalized", false) || token.value("lstrip", false) || token.value("rstrip", false) ||
        token.value("single_word", false))
      throw TokenizerError(where + ": added token " + token.at("content").get<std::string>() +
                           " has matching options that are not supported" + unsupported);
    t.added_.emplace_back(token.at("content").get<std::string>(), token.at("id").get<int64_t>());
  }
  std::stable_sort(t.added_.begin(), t.added_.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  const json post = doc.value("post_processor", json());
  if (type_of(post) == "TemplateProcessing") {
    for (const auto& item : post.at("single")) {
      if (item.contains("Sequence")) {
        t.template_.push_back("$A");
      } else {
        const std::string name = item.at("SpecialToken").at("id");
        t.template_.push_back(name);
        t.special_ids_[name] = post.at("special_tokens").at(name).at("ids").get<std::vector<int64_t>>();
      }
    }
  } else if (type_of(post) == "none") {
    t.template_ = {"$A"};
  } else {
    throw TokenizerError(where + ": post_processor " + type_of(post) + " is not supported" + unsupported);
  }
  // transformers pads with the id of the pad token (tokenizer.json's padding section names it).
  const json padding = doc.value("padding", json());
  if (padding.is_object() && padding.contains("pad_id")) {
    t.pad_id_ = padding.at("pad_id").get<int64_t>();
  } else {
    const auto pad = t.vocab_.find("<pad>");
    if (pad == t.vocab_.end()) throw TokenizerError(where + ": no padding section and no <pad> token to pad with");
    t.pad_id_ = pad->second;
  }
  return t;
}

std::vector<int64_t> Tokenizer::words(const std::string& text) const {
  std::vector<int64_t> out;
  auto word_ids = [&](const std::string& piece) {
#ifdef FORESIGHT_HAVE_SENTENCEPIECE
    if (spm_) {  // each stretch between special tokens encoded on its own, as tokenizers does
      std::vector<int> ids;
      const auto status = spm_->Encode(piece, &ids);
      if (!status.ok()) throw TokenizerError("sentencepiece could not encode the prompt: " + status.ToString());
      out.insert(out.end(), ids.begin(), ids.end());
      return;
    }
#endif
    size_t i = 0;
    while (i < piece.size()) {
      const Kind k = kind_of(static_cast<unsigned char>(piece[i]));
      size_t j = i + 1;
      while (j < piece.size() && kind_of(static_cast<unsigned char>(piece[j])) == k) ++j;
      if (k != Kind::space) {
        std::string word = piece.substr(i, j - i);
        if (lowercase_) std::transform(word.begin(), word.end(), word.begin(), [](unsigned char c) {
            return static_cast<char>(c >= 'A' && c <= 'Z' ? c + 32 : c);
          });
        const auto found = vocab_.find(word);
        if (found != vocab_.end()) {
          out.push_back(found->second);
        } else if (unk_id_ >= 0) {
          out.push_back(unk_id_);
        } else {
          throw TokenizerError("the word \"" + word + "\" is not in the tokenizer's vocabulary and it has no unknown "
                               "token");
        }
      }
      i = j;
    }
  };
  // Special added tokens are matched in the raw text first (leftmost, then longest); the text between
  // them is normalized and split.
  size_t start = 0, pos = 0;
  while (pos < text.size()) {
    const auto hit = std::find_if(added_.begin(), added_.end(),
                                  [&](const auto& a) { return text.compare(pos, a.first.size(), a.first) == 0; });
    if (hit == added_.end()) {
      ++pos;
      continue;
    }
    word_ids(text.substr(start, pos - start));
    out.push_back(hit->second);
    pos += hit->first.size();
    start = pos;
  }
  word_ids(text.substr(start));
  return out;
}

Encoding Tokenizer::encode(const std::string& text, int max_length) const {
  if (spm_ && !valid_utf8(text)) throw TokenizerError("the prompt is not valid UTF-8: pass it as UTF-8 text");
  for (unsigned char c : text)
    if (c >= 0x80 && !spm_)
      throw TokenizerError("the prompt has non-ASCII characters, which the C++ word-level tokenizer does not read; "
                           "write it in ASCII or run foresight-run");
  size_t specials = 0;
  for (const auto& item : template_)
    if (item != "$A") specials += special_ids_.at(item).size();
  if (max_length < static_cast<int>(specials))
    throw TokenizerError("max_length " + std::to_string(max_length) + " leaves no room for the " +
                         std::to_string(specials) + " special token(s) the tokenizer adds");
  std::vector<int64_t> ids = words(text);
  Encoding enc;
  const size_t room = static_cast<size_t>(max_length) - specials;
  if (ids.size() > room) {
    ids.resize(room);
    enc.truncated = true;
  }
  for (const auto& item : template_) {
    const auto& part = item == "$A" ? ids : special_ids_.at(item);
    enc.ids.insert(enc.ids.end(), part.begin(), part.end());
  }
  enc.mask.assign(enc.ids.size(), 1);
  enc.ids.resize(max_length, pad_id_);
  enc.mask.resize(max_length, 0);
  return enc;
}

}  // namespace foresight
