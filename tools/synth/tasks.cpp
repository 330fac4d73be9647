#include "tasks.h"

#include <algorithm>
#include <cctype>
#include <stdexcept>

namespace vchat::synth {

const char* kind_name(SampleKind k) {
  switch (k) {
    case SampleKind::single: return "single";
    case SampleKind::multi_round: return "multi_round";
    case SampleKind::multi_image: return "multi_image";
  }
  return "?";
}

namespace {

constexpr int kMaxImages = 8;  // the chat template's limit (DESIGN.md §4.1)
const char* const kOrdinals[kMaxImages] = {"first", "second", "third", "fourth",
                                           "fifth", "sixth",  "seventh", "eighth"};
const char* const kNumbers[kMaxImages + 1] = {"zero", "one", "two",   "three", "four",
                                              "five", "six", "seven", "eight"};

struct QA {
  std::string question, answer;
};

// Questions about one image. `ref` < 0: the latest image shown; otherwise that image's index.
enum class Ask { colour, count, count_type, exists, left };

std::string plural(ShapeType t) { return std::string(type_name(t)) + "s"; }
std::string in_image(int ref) { return ref < 0 ? "" : std::string(" in the ") + kOrdinals[ref] + " image"; }
const char* colour_name(int c) { return palette()[c].name; }

QA q_colour(const Image& img, int ref) {
  if (img.shapes.size() != 1) throw std::logic_error("q_colour: needs exactly one shape");
  return {"What colour is the shape" + in_image(ref) + "?", colour_name(img.shapes[0].colour)};
}

QA q_count(const Image& img, int ref) {
  const std::string lead = ref < 0 ? "How" : std::string("In the ") + kOrdinals[ref] + " image, how";
  return {lead + " many shapes are there?", std::to_string(img.shapes.size())};
}

int count_type(const Image& img, ShapeType t) {
  return static_cast<int>(std::count_if(img.shapes.begin(), img.shapes.end(), [&](const Shape& s) { return s.type == t; }));
}

QA q_count_type(const Image& img, ShapeType t, int ref) {
  const std::string lead = ref < 0 ? "How" : std::string("In the ") + kOrdinals[ref] + " image, how";
  return {lead + " many " + plural(t) + " are there?", std::to_string(count_type(img, t))};
}

bool has(const Image& img, int colour, ShapeType t) {
  for (const Shape& s : img.shapes)
    if (s.colour == colour && s.type == t) return true;
  return false;
}

QA q_exists(const Image& img, int colour, ShapeType t, int ref) {
  return {std::string("Is there a ") + colour_name(colour) + " " + type_name(t) + in_image(ref) + "?",
          has(img, colour, t) ? "yes" : "no"};
}

// "On the left" is only asked of two shapes of different types whose horizontal extents
// do not overlap, so the answer cannot depend on how a viewer weighs position.
bool left_applies(const Image& img) {
  if (img.shapes.size() != 2) return false;
  const Shape &a = img.shapes[0], &b = img.shapes[1];
  return a.type != b.type && std::abs(a.x - b.x) > (a.size + b.size) / 2;
}

QA q_left(const Image& img, int ref) {
  if (!left_applies(img)) throw std::logic_error("q_left: needs two separated shapes of different types");
  const Shape& l = img.shapes[0].x < img.shapes[1].x ? img.shapes[0] : img.shapes[1];
  return {"Which shape is on the left" + in_image(ref) + "?", type_name(l.type)};
}

std::vector<Ask> applicable(const Image& img) {
  std::vector<Ask> out = {Ask::count, Ask::count_type, Ask::exists};
  if (img.shapes.size() == 1) out.push_back(Ask::colour);
  if (left_applies(img)) out.push_back(Ask::left);
  return out;
}

// A question of the given kind about an already drawn image, its parameters chosen so the
// answers stay balanced: yes/no half each, counted types half the time ones present.
QA ask(Rng& rng, const Image& img, Ask kind, int ref) {
  switch (kind) {
    case Ask::colour: return q_colour(img, ref);
    case Ask::count: return q_count(img, ref);
    case Ask::count_type: {
      const ShapeType t = rng.chance(0.5) ? rng.pick(img.shapes).type
                                          : static_cast<ShapeType>(rng.uniform(0, kShapeTypes - 1));
      return q_count_type(img, t, ref);
    }
    case Ask::exists: {
      if (rng.chance(0.5)) {
        const Shape& s = rng.pick(img.shapes);
        return q_exists(img, s.colour, s.type, ref);
      }
      // "No": mostly near misses (a present colour on another type or the reverse), so the
      // colour and the type must both be checked; colours limited to the background's, so
      // the background alone never gives the answer away.
      const std::vector<int> colours = colours_for(img.dark);
      for (int tries = 0; tries < 1000; ++tries) {
        int c = rng.pick(colours);
        auto t = static_cast<ShapeType>(rng.uniform(0, kShapeTypes - 1));
        if (rng.chance(0.7)) {
          const Shape& s = rng.pick(img.shapes);
          if (rng.chance(0.5)) c = s.colour; else t = s.type;
        }
        if (!has(img, c, t)) return q_exists(img, c, t, ref);
      }
      throw std::logic_error("ask: no absent colour/type combination");
    }
    case Ask::left: return q_left(img, ref);
  }
  throw std::logic_error("ask: unknown kind");
}

QA ask_any(Rng& rng, const Image& img, int ref) { return ask(rng, img, rng.pick(applicable(img)), ref); }

ShapeType random_type(Rng& rng) { return static_cast<ShapeType>(rng.uniform(0, kShapeTypes - 1)); }

// `k` shapes of type t among `n`, the others of other types.
ImageSpec with_type_count(ShapeType t, int k, int n) {
  ImageSpec spec;
  for (int i = 0; i < n; ++i) {
    ShapeSpec s;
    if (i < k) s.type = static_cast<int>(t); else s.ex_type = static_cast<int>(t);
    spec.shapes.push_back(s);
  }
  return spec;
}

ImageSpec random_spec(int n) { return ImageSpec{std::vector<ShapeSpec>(n), false, false}; }

// ---- single image, one round: scenes built for the question, answers balanced ----

Sample single(Rng& rng, int S) {
  Sample s;
  s.kind = SampleKind::single;
  QA qa;
  switch (rng.uniform(0, 4)) {
    case 0: {  // colour of the only shape
      s.images.push_back(make_image(rng, S, random_spec(1)));
      qa = q_colour(s.images[0], -1);
      break;
    }
    case 1: {  // count: 1..4 uniform
      s.images.push_back(make_image(rng, S, random_spec(rng.uniform(1, kMaxShapes))));
      qa = q_count(s.images[0], -1);
      break;
    }
    case 2: {  // count of one type: 0..4 uniform
      const ShapeType t = random_type(rng);
      const int k = rng.uniform(0, kMaxShapes);
      const int n = rng.uniform(std::max(k, 1), kMaxShapes);
      s.images.push_back(make_image(rng, S, with_type_count(t, k, n)));
      qa = q_count_type(s.images[0], t, -1);
      break;
    }
    case 3: {  // is there a <colour> <type>: yes/no half each
      const int c = rng.uniform(0, palette_size() - 1);
      const ShapeType t = random_type(rng);
      const int n = rng.uniform(1, kMaxShapes);
      ImageSpec spec;
      spec.force_dark = !palette()[c].on_light;  // white/yellow: same background either answer
      for (int i = 0; i < n; ++i) spec.shapes.push_back({-1, -1, static_cast<int>(t), c});
      if (rng.chance(0.5)) {
        spec.shapes[0] = {static_cast<int>(t), c, -1, -1};
      } else if (rng.chance(0.7)) {  // near miss: same colour or same type, not both
        if (rng.chance(0.5)) spec.shapes[0].colour = c; else spec.shapes[0].type = static_cast<int>(t);
      }
      s.images.push_back(make_image(rng, S, spec));
      qa = q_exists(s.images[0], c, t, -1);
      break;
    }
    default: {  // which shape is on the left: two types, two columns
      const int t1 = rng.uniform(0, kShapeTypes - 1);
      const int t2 = (t1 + rng.uniform(1, kShapeTypes - 1)) % kShapeTypes;
      ImageSpec spec{{{t1, -1, -1, -1}, {t2, -1, -1, -1}}, true, false};
      s.images.push_back(make_image(rng, S, spec));
      qa = q_left(s.images[0], -1);
      break;
    }
  }
  s.rounds.push_back({1, qa.question, qa.answer});
  return s;
}

// ---- one image, 2-3 rounds of different question kinds about it ----

Sample multi_round(Rng& rng, int S) {
  Sample s;
  s.kind = SampleKind::multi_round;
  const int n = rng.uniform(1, kMaxShapes);
  ImageSpec spec = random_spec(n);
  // Half the two-shape scenes are laid out for a left/right question.
  if (n == 2 && rng.chance(0.5)) {
    spec.distinct_columns = true;
    spec.shapes[0].type = rng.uniform(0, kShapeTypes - 1);
    spec.shapes[1].ex_type = spec.shapes[0].type;
  }
  s.images.push_back(make_image(rng, S, spec));
  std::vector<Ask> kinds = applicable(s.images[0]);
  rng.shuffle(kinds);
  kinds.resize(std::min<size_t>(kinds.size(), rng.uniform(2, 3)));
  for (size_t r = 0; r < kinds.size(); ++r) {
    const QA qa = ask(rng, s.images[0], kinds[r], -1);
    s.rounds.push_back({r == 0 ? 1 : 0, qa.question, qa.answer});
  }
  return s;
}

// ---- 2..max_images images and one question across them ----

std::string answer_choices(int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out += std::string(i == 0 ? "" : i + 1 == n ? " or " : ", ") + kOrdinals[i];
  return out;
}

Sample multi_image(Rng& rng, int S, int max_images) {
  Sample s;
  s.kind = SampleKind::multi_image;
  const int n = rng.uniform(2, std::min(max_images, kMaxImages));
  QA cross;
  switch (rng.uniform(0, 2)) {
    case 0: {  // which image has more of a type: a unique winner, uniform over the images
      const ShapeType t = random_type(rng);
      const int winner = rng.uniform(0, n - 1);
      const int top = rng.uniform(1, kMaxShapes);
      for (int i = 0; i < n; ++i) {
        const int k = i == winner ? top : rng.uniform(0, top - 1);
        s.images.push_back(make_image(rng, S, with_type_count(t, k, rng.uniform(std::max(k, 1), kMaxShapes))));
      }
      cross.question = n == 2 ? "Which image has more " + plural(t) + "? Answer first or second."
                              : "Which image has the most " + plural(t) + "? Answer " + answer_choices(n) + ".";
      cross.answer = kOrdinals[winner];
      break;
    }
    case 1: {  // do all images contain a type: yes/no half each; "no" usually one image short
      const ShapeType t = random_type(rng);
      const bool yes = rng.chance(0.5);
      std::vector<bool> lacks(n, false);
      if (!yes) {
        lacks[rng.uniform(0, n - 1)] = true;
        for (int i = 0; i < n; ++i) lacks[i] = lacks[i] || rng.chance(0.2);
      }
      for (int i = 0; i < n; ++i) {
        const int k = lacks[i] ? 0 : rng.uniform(1, 2);
        s.images.push_back(make_image(rng, S, with_type_count(t, k, rng.uniform(std::max(k, 1), kMaxShapes))));
      }
      const std::string who = n == 2 ? "both" : std::string("all ") + kNumbers[n];
      cross.question = "Do " + who + " images contain a " + std::string(type_name(t)) + "?";
      cross.answer = yes ? "yes" : "no";
      break;
    }
    default: {  // colour of the lone shape in one named image
      const int j = rng.uniform(0, n - 1);
      for (int i = 0; i < n; ++i) s.images.push_back(make_image(rng, S, random_spec(i == j ? 1 : rng.uniform(1, kMaxShapes))));
      cross = q_colour(s.images[j], j);
      break;
    }
  }

  if (rng.chance(0.4)) {
    // Interleaved: one image per round with a question about it, the cross question last.
    for (int i = 0; i < n; ++i) {
      const QA qa = ask_any(rng, s.images[i], -1);
      s.rounds.push_back({1, qa.question, qa.answer});
    }
    s.rounds.push_back({0, cross.question, cross.answer});
  } else {
    // All images up front, then 0-2 follow-ups naming one image by position.
    s.rounds.push_back({n, cross.question, cross.answer});
    const int follow = rng.uniform(0, 2);
    for (int f = 0; f < follow; ++f) {
      const int j = rng.uniform(0, n - 1);
      const QA qa = ask_any(rng, s.images[j], j);
      s.rounds.push_back({0, qa.question, qa.answer});
    }
  }
  return s;
}

// Later rounds without a new image read as follow-ups: "And how many ...".
void mark_follow_ups(Sample& s) {
  for (size_t r = 1; r < s.rounds.size(); ++r) {
    std::string& q = s.rounds[r].question;
    if (s.rounds[r].new_images != 0 || q.empty()) continue;
    q[0] = static_cast<char>(std::tolower(static_cast<unsigned char>(q[0])));
    q = "And " + q;
  }
}

}  // namespace

Sample make_sample(Rng& rng, int image_size, int max_images) {
  if (max_images < 1 || max_images > kMaxImages) throw std::logic_error("make_sample: max_images out of range");
  const int roll = rng.uniform(0, 9);  // 0-4 single, 5-7 multi-round, 8-9 multi-image
  Sample s;
  if (roll < 5) s = single(rng, image_size);
  else if (roll < 8 || max_images < 2) s = multi_round(rng, image_size);
  else s = multi_image(rng, image_size, max_images);
  mark_follow_ups(s);
  return s;
}

}  // namespace vchat::synth
