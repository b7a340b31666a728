// A prompt tokenizer read from an engines folder's tokenizer/tokenizer.json (Hugging Face tokenizers
// format), encoding as the Python runtime's `tokenizer(text, padding="max_length", truncation=True,
// max_length=L)` call does.
//
// Supported: the word-level tokenizers of the shipped small models (normalizer Lowercase, pre-tokenizer
// Whitespace, model WordLevel, post-processor TemplateProcessing, special added tokens) on ASCII text;
// and, when built with the sentencepiece library (FORESIGHT_HAVE_SENTENCEPIECE: CMake finds
// libsentencepiece), the T5/UMT5 tokenizers of released checkpoints (model Unigram converted from the
// spiece.model next to tokenizer.json, which the sentencepiece library encodes) on UTF-8 text.
// Anything else is refused with TokenizerError naming it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace foresight {

// True when this build reads SentencePiece (Unigram) tokenizers.
bool has_sentencepiece();

class TokenizerError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Encoding {
  std::vector<int64_t> ids;   // max_length ids: the text's, the template's special tokens, then padding
  std::vector<int64_t> mask;  // 1 for the text's and the special tokens, 0 for padding
  bool truncated = false;     // the text had more tokens than fit
};

class Tokenizer {
 public:
  // Reads `path` (a tokenizer.json; a Unigram one with the spiece.model in its folder); throws
  // TokenizerError for a file of a kind it does not support.
  static Tokenizer load(const std::string& path);
  // `spm_path`: the SentencePiece model a Unigram tokenizer.json was converted from ("" for none).
  static Tokenizer from_json(const std::string& text, const std::string& where, const std::string& spm_path = "");

  // `text` tokenized, truncated to max_length (keeping room for the template's special tokens) and
  // padded to max_length on the right. Throws TokenizerError for non-ASCII text (word-level) or text
  // that is not UTF-8 (SentencePiece).
  Encoding encode(const std::string& text, int max_length) const;
  int64_t pad_id() const { return pad_id_; }
  bool sentencepiece() const { return spm_ != nullptr; }
  size_t vocab_size() const { return vocab_.size(); }

 private:
  std::vector<int64_t> words(const std::string& text) const;

  std::map<std::string, int64_t> vocab_;
  std::vector<std::pair<std::string, int64_t>> added_;  // special added tokens, longest first
  std::vector<std::string> template_;                   // "$A" or a special token's name, in order
  std::map<std::string, std::vector<int64_t>> special_ids_;
  bool lowercase_ = false;
  int64_t unk_id_ = -1, pad_id_ = 0;
  std::shared_ptr<const sentencepiece::SentencePieceProcessor> spm_;  // Unigram tokenizers' encoder
};

}  // namespace foresight
